"""How the workflow words what operators read (`error_msg`, `ALERT:` lines)."""


def duration(seconds: float) -> str:
    """`seconds` as an operator reads a setting's value: `3 days`, `36 h`, `90 s`."""
    if seconds >= 86_400 and seconds % 3600 == 0:
        return f"{seconds / 86_400:g} days" if seconds % 86_400 == 0 else f"{seconds / 3600:g} h"
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"
