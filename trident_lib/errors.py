"""Errors that name the slide and the problem, so a lab knows which file to fix and how."""


class SlideError(Exception):
    """Base class for problems with one slide. The message always names the slide."""

    def __init__(self, slide: str, problem: str, fix: str | None = None):
        self.slide = str(slide)
        self.problem = problem
        self.fix = fix
        msg = f"{self.slide}: {problem}"
        if fix:
            msg += f" Fix: {fix}"
        super().__init__(msg)

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return (type(self), (self.slide, self.problem, self.fix))


class SlideReadError(SlideError):
    """The file is not a slide this reader can open (wrong format, truncated, corrupt)."""


class UnsupportedFormatError(SlideError):
    """No reader handles this file extension."""


class MissingMPPError(SlideError):
    """The slide carries no pixel size and none was given."""


class SlideTooLargeError(SlideError):
    """An image would not fit in memory for a reader that decodes it whole."""


class TooLowResolutionError(SlideError):
    """The requested magnification is far above what the slide was scanned at: patches would be invented
    by upsampling, not read."""

    status = "too_low_resolution"


class MissingDependencyError(ImportError):
    """An optional package is needed for this reader or model."""

    def __init__(self, what: str, package: str, extra: str | None = None):
        hint = f"pip install {package}" if extra is None else f"pip install 'trident-dagster[{extra}]'"
        super().__init__(f"{what} needs the package '{package}', which is not installed. Install it: {hint}")
        self.package = package


class WeightsNotFoundError(FileNotFoundError):
    """Model weights are not available locally (no hub is reachable)."""

    def __init__(self, model: str, looked: list[str], how: str):
        places = "; ".join(looked) if looked else "nowhere"
        super().__init__(f"No weights for '{model}'. Looked in: {places}. {how}")
        self.model = model
        self.looked = looked
