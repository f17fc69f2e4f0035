"""The report's error, and the check that its optional plotting libraries are installed."""
from __future__ import annotations

from featcache.errors import FerError

INSTALL_HINT = "pip install 'cafe-fer[report]'"


class ReportError(FerError):
    """No report: not a run or sweep directory, a bad --baseline, the optional extra not installed."""


def require_libraries(tsne: bool = True) -> None:
    """Fail early, before anything is written, when the optional extra is not installed."""
    missing = []
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        missing.append("matplotlib")
    if tsne:
        try:
            import sklearn  # noqa: F401
            from sklearn.manifold import TSNE  # noqa: F401
        except ImportError:
            missing.append("scikit-learn")
    if missing:
        raise ReportError(f"maskfer report needs {' and '.join(missing)}, which are not installed: "
                          f"install the optional extra with  {INSTALL_HINT}")
