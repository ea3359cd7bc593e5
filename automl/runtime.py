"""Process-level settings: offline hubs, devices, CPU threads, quiet logs."""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """automl's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache): converted weights, learned costs."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "automl"


def configure_offline_hubs() -> None:
    """Make hub look-ups fail fast when no hub is reachable.

    transformers/timm retry unreachable hubs for about a minute unless
    HF_HUB_OFFLINE is set before they are imported. We only set it when the
    user has not said otherwise (AUTOML_ONLINE=1 keeps hub access on).
    """
    if os.environ.get("AUTOML_ONLINE") == "1":
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_libraries(search: bool = True) -> None:
    """Silence chatty third-party logs; users see our progress view instead.

    search=False: for a process that never searches (a serving replica), which then does not import Optuna
    (Optuna resets its log level when it is first imported, so a searching process must import it here)."""
    for name in ("ray", "ray.tune", "ray.train", "ray.data", "ray.serve", "transformers", "timm", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if search:
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
        except ImportError:  # pragma: no cover - optuna is a hard dependency
            pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")


def device() -> "torch.device":  # noqa: F821
    """The one place the device is chosen: AUTOML_DEVICE when set (e.g. "cpu" to keep a GPU free), else CUDA,
    then Apple MPS, else CPU. Every stage takes its device from here (or from the plan), model and inputs alike."""
    import torch

    if os.environ.get("AUTOML_DEVICE"):
        return torch.device(os.environ["AUTOML_DEVICE"])
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(dev) -> "torch.dtype | None":  # noqa: F821
    """Mixed precision for a device: bf16 on CUDA where supported, else fp16 (with a grad scaler); none on a CPU,
    where bf16 autocast made small CNNs 1.7-5x slower (measured)."""
    import torch

    if getattr(dev, "type", str(dev)) != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products in hardware (Intel AMX), where bf16 autocast makes transformer
    steps faster; elsewhere it made small CNNs 1.7-5x slower (measured on an AMD EPYC). AUTOML_CPU_BF16=1 or 0
    overrides the detection."""
    forced = os.environ.get("AUTOML_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.14; absent means no
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def first_pass_is_slow(dev) -> bool:
    """Whether a model's first pass of a new input shape on `dev` pays one-off costs (kernel selection and
    compilation, lazy loading of device code) that later passes do not: an accelerator's, not a CPU's. Timings
    that a plan scales by a row or step count must leave that first pass out."""
    return getattr(dev, "type", str(dev)) not in ("cpu", "meta")


def autocast(dev, cpu: bool = False):
    """An autocast context for `dev` (a no-op where mixed precision does not pay). cpu: bf16 on a CPU too (the
    caller has decided it pays: its model gains, as transformers do and small CNNs do not, and `cpu_bf16()`)."""
    import contextlib

    import torch

    dtype = amp_dtype(dev)
    if dtype is not None:
        return torch.autocast(device_type="cuda", dtype=dtype)
    if cpu and getattr(dev, "type", str(dev)) == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(n: int) -> None:
    """Cap torch's intra-op threads so concurrent trials don't oversubscribe cores."""
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


@contextmanager
def threads_kept():
    """Give back, on exit, torch's thread count and OMP_NUM_THREADS as they were: set_threads changes both for the
    whole process, which must not outlast work done in the caller's process (in-process folds, a test)."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


@contextmanager
def sigint_kept():
    """Give back, on exit, the Ctrl-C (SIGINT) handler as it was: Tune and Ray Train install their own and leave it
    in place after a search or a training run, where a later Ctrl-C then did nothing, or exited without a word.
    Only the main thread has signal handlers; elsewhere this does nothing."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


configure_offline_hubs()
