"""Logger factories: W&B offline unless credentials exist; config tree printing."""

from __future__ import annotations

import logging
import netrc
import os
import threading
from typing import Any

import httpx
import rich
import rich.syntax
import rich.tree
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True when WANDB_API_KEY is set or `wandb login` stored a key in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_reachable(timeout: float = 3.0) -> bool:
    """True when the W&B server (WANDB_BASE_URL, default api.wandb.ai) answers HTTP within `timeout`
    seconds."""
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    answered = threading.Event()

    def probe() -> None:
        try:
            httpx.get(url, timeout=timeout)
            answered.set()
        except httpx.HTTPError:
            pass

    # a thread bounds DNS look-ups too, which ignore timeouts
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return answered.is_set()


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """A WandbLogger that runs offline (no network wait) when there are no credentials, WANDB_MODE=offline, or
    the W&B server does not answer within seconds (a key set on an offline machine)."""
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_has_credentials()
    if not offline and not wandb_reachable():
        offline = True
        os.environ["WANDB_MODE"] = "offline"
        log.warning(
            "W&B: credentials found but %s does not answer; logging offline under %s/wandb instead "
            "(upload later with `wandb sync`)",
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"),
            kwargs.get("save_dir", "."),
        )
    elif offline:
        os.environ.setdefault("WANDB_MODE", "offline")
        log.info(
            "W&B: no credentials found (WANDB_API_KEY / wandb login), logging offline under %s/wandb; "
            "upload later with `wandb sync`",
            kwargs.get("save_dir", "."),
        )
    return WandbLogger(offline=offline, **kwargs)


def print_config_tree(cfg: DictConfig) -> None:
    """Print the resolved config as a rich tree, one branch per top-level group."""
    tree = rich.tree.Tree("config", style="bold")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key), style="bold").add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)
