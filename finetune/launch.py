"""`datagen finetune`'s work behind the command line: settings from the config file and flags,
the SFT or DPO recipe in this process, or the same command under torchrun on several.

    line = run_finetune(Path("out/dataset"), Path("out/student"), method="lora", flags={...},
                        launch={...}, nproc=None, config=None)

`--nproc N` (or any multi-node option) runs `python -m torch.distributed.run ... -m
datagen.finetune ARGS` and waits; each rank then comes back here with torchrun's environment
and trains its share (`datagen.finetune.distributed`). The data is read before any process
starts, so a bad file is one error line; a failed rank's `error:` line is passed on once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from datagen.errors import ConfigError, DatagenError

FINETUNE_METHODS = ("lora", "qlora", "dpo")  # `datagen finetune --method`: its help and its check


def run_finetune(data: Path, out: Path, *, method: str | None, flags: dict[str, tuple[Any, str]],
                 launch: dict[str, Any], nproc: int | None, config: Path | None) -> str | None:
    """Train as `datagen finetune` does; the closing line to print (None on ranks other than 0,
    and where torchrun ran the ranks and they printed it).

    flags: config field -> (value or None, the flag that set it); `beta` is DPO's alone and
    SFT's data options (`datagen.finetune.config.SFT_ONLY_FIELDS`) SFT's alone.
    launch: torchrun's multi-node options (`datagen.finetune.distributed.torchrun_command`)."""
    from datagen.config_file import load_config
    from datagen.finetune.config import SFT_ONLY_FIELDS

    if method is not None and method not in FINETUNE_METHODS:
        raise ConfigError(f"--method: expected one of {', '.join(FINETUNE_METHODS)}, got {method!r}")
    dpo = method == "dpo"
    flags = dict(flags)
    if dpo:
        flags["method"] = (None, "--method")  # the adapter kind comes from the dpo: section
        for key in SFT_ONLY_FIELDS:
            value, flag = flags.pop(key, (None, ""))
            if value is not None:
                raise ConfigError(f"{flag}: only for SFT (--method lora or qlora)")
    elif flags.pop("beta", (None, ""))[0] is not None:
        raise ConfigError("--beta: only with --method dpo")
    section = "dpo" if dpo else "finetune"
    settings = getattr(load_config(config, {f"{section}.{key}": (flag, value)
                                            for key, (value, flag) in flags.items()}), section)
    processes = nproc if nproc is not None else 1
    several_processes = nproc is not None or any(value is not None for value in launch.values())
    settings.check_distributed(several_processes or int(os.environ.get("WORLD_SIZE", 1)) > 1)

    if several_processes and "TORCHELASTIC_RUN_ID" not in os.environ:
        if dpo:
            from datagen.finetune.pairs import load_pairs

            launch_torchrun(processes, data, out, {**flags, "method": ("dpo", "--method")}, config, launch,
                            check_data=load_pairs)
        else:
            launch_torchrun(processes, data, out, flags, config, launch)
        return None
    if dpo:
        from datagen.finetune.dpo import format_dpo_summary, train_dpo

        line = format_dpo_summary(train_dpo(settings, data, out))
    else:
        from datagen.finetune.sft import format_sft_summary, train

        line = format_sft_summary(train(settings, data, out))
    return line if int(os.environ.get("RANK", 0)) == 0 else None


def launch_torchrun(nproc: int, data: Path, out: Path, flags: dict[str, tuple[Any, str]], config: Path | None,
                    launch: dict[str, Any], check_data: Any = None) -> None:
    """Run this finetune under torchrun (`python -m datagen.finetune` on every rank) and wait.

    The data is read here first, so a bad file is one error line before any process starts."""
    import subprocess

    from datagen.finetune.data import load_conversations
    from datagen.finetune.distributed import torchrun_command

    command = torchrun_command(sys.executable, nproc, [], **launch)  # checks --nproc first
    if check_data is not None:
        check_data(data)
    else:
        load_conversations(data, input_format=flags.get("input_format", (None, ""))[0],
                           split=flags.get("split", (None, ""))[0])
    worker_args = [str(data), "--out", str(out)]
    for value, flag in flags.values():
        if isinstance(value, bool):
            worker_args.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            worker_args += [flag, str(value)]
    if config is not None:
        worker_args += ["--config", str(config)]
    # torchrun sets OMP_NUM_THREADS=1 per rank when unset, with a banner; set it quietly instead
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    launcher = subprocess.Popen(command + worker_args, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    rank_error = _relay_rank_output(launcher.stderr)
    if launcher.wait():
        if rank_error:  # every rank says the same: once is enough
            raise DatagenError(rank_error.removeprefix("error: "))
        raise DatagenError(f"torchrun: a rank failed (exit {launcher.returncode}); rerun the same command to resume")


def _relay_rank_output(stream) -> str | None:
    """Pass the ranks' progress through until one prints an `error:` line; return that line.

    What follows it (the same line from the other ranks, torchrun's warnings and its traceback
    about the failed child) is noise once the cause is known."""
    first_error = None
    for line in stream:
        if first_error is None and line.startswith("error: "):
            first_error = line.strip()
        elif first_error is None:
            sys.stderr.write(line)
    return first_error
