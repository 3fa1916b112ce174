"""Atomic, resumable checkpoints in mlx-lm's adapter format.

A checkpoint directory ``checkpoint-{step}`` holds

* ``adapters.safetensors`` + ``adapter_config.json``: the trainable weights in mlx-lm's
  format, so ``mlx_lm.load(base, adapter_path=ckpt)`` loads them (LoRA adapters, or every
  weight with ``fine_tune_type="full"``);
* ``optimizer.safetensors``: the optimizer state tree, flattened;
* ``trainer_state.json``: step, RNG key, data-sampler state, the GRPO config, and any extra
  JSON the trainer records.

It is written into a temporary sibling directory, every file and the directory fsynced, then
renamed into place, so a crash at any moment leaves either the previous complete checkpoint
or the new complete one, never a partial directory under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from grpo.core.state import TrainState
from grpo.errors import CheckpointError

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
REQUIRED = (ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, TRAINER_STATE)
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_error(what: str, path: Path, e: BaseException) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a failed write, naming the path and the cause.

    mlx reports a full disk as ``RuntimeError("[write] Unable to write N bytes")``; the free
    space left on the device tells that case apart, so it is named ENOSPC too.
    """
    if isinstance(e, OSError) and e.errno:
        reason = f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"
    else:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        probe = next((p for p in (path, *path.parents) if p.exists()), None)
        try:
            free = shutil.disk_usage(probe).free if probe is not None else None
        except OSError:
            free = None
        if free is not None and free < 1 << 20:
            reason = f"No space left on device (ENOSPC, {free} bytes free; {reason})"
    return CheckpointError(f"cannot write {what} {path}: {reason}")


def _flat(tree: Any) -> dict[str, mx.array]:
    return dict(tree_flatten(tree))


def full_adapter_config(num_layers: int, *, base: str | None = None) -> dict:
    """mlx-lm ``adapter_config.json`` for a full fine-tune (every weight in the file)."""
    out = {"fine_tune_type": "full", "num_layers": num_layers, "lora_parameters": None}
    if base is not None:
        out["model"] = str(base)
    return out


def save_checkpoint(
    directory: str | Path,
    state: TrainState,
    *,
    adapter_config: dict,
    trainer_state: dict | None = None,
    extra_trees: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` atomically to ``directory`` (replacing any existing one).

    Args:
        directory: final checkpoint directory, e.g. ``output_dir / "checkpoint-30"``.
        state: the :class:`TrainState` to save (evaluated here).
        adapter_config: mlx-lm adapter config (``fine_tune_type`` ``"lora"`` or ``"full"``).
        trainer_state: extra JSON-able data (sampler position, config, metrics history).
        extra_trees: more array trees to keep, ``{file name: tree}`` (e.g. a synced
            reference model), written inside the same atomic save.

    Returns:
        ``directory`` as a ``Path``.
    """
    directory = Path(directory)
    parent = directory.parent
    if parent.exists() and not parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint: output path {parent} is a file")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=parent))
    except OSError as e:
        raise write_error("checkpoint", directory, e) from e
    mx.eval(state)
    try:
        mx.save_safetensors(str(tmp / ADAPTERS), _flat(state.params), metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / OPTIMIZER), _flat(state.opt_state))
        for name, tree in (extra_trees or {}).items():
            mx.eval(tree)
            mx.save_safetensors(str(tmp / name), _flat(tree))
            _fsync_file(tmp / name)
        _write_json(tmp / ADAPTER_CONFIG, adapter_config)
        meta = {
            "step": int(state.step.item()),
            "key": [int(v) for v in state.key.tolist()],
            **(trainer_state or {}),
        }
        _write_json(tmp / TRAINER_STATE, meta)
        for name in REQUIRED:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if directory.exists():
            old = parent / f".old-{directory.name}-{os.getpid()}"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync_dir(parent)
    except Exception as e:
        error = write_error("checkpoint", directory, e)  # before freeing the space
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_adapters(directory: str | Path, params: Any, *, adapter_config: dict) -> Path:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` into ``directory``.

    Each file is written to a temporary name, fsynced and renamed, so a reader never sees a
    half-written file. Loadable by ``mlx_lm.load(base, adapter_path=directory)``.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save the model: {directory} is a file")
    flat = _flat(params)
    mx.eval(flat)
    tmp_weights = directory / f".tmp-{os.getpid()}-{ADAPTERS}"
    tmp_config = directory / f".tmp-{os.getpid()}-{ADAPTER_CONFIG}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp_weights), flat, metadata={"format": "mlx"})
        _write_json(tmp_config, adapter_config)
        for tmp in (tmp_weights, tmp_config):
            _fsync_file(tmp)
        os.replace(tmp_weights, directory / ADAPTERS)
        os.replace(tmp_config, directory / ADAPTER_CONFIG)
        _fsync_dir(directory)
    except Exception as e:
        raise write_error("the model to", directory, e) from e
    finally:
        for tmp in (tmp_weights, tmp_config):
            tmp.unlink(missing_ok=True)
    return directory


def _check_complete(directory: Path) -> None:
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint path is not a directory: {directory}")
    missing = [n for n in REQUIRED if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {missing}")


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError / ValueError on truncated files
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {e}") from e


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {e}") from e


def _fill(template: Any, flat: dict[str, mx.array], what: str, directory: Path) -> Any:
    want = _flat(template)
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{what} in {directory} do not match the model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    bad = [
        f"{k}: checkpoint {tuple(flat[k].shape)} {flat[k].dtype} vs model "
        f"{tuple(v.shape)} {v.dtype}"
        for k, v in want.items()
        if tuple(flat[k].shape) != tuple(v.shape) or flat[k].dtype != v.dtype
    ]
    if bad:
        raise CheckpointError(f"{what} in {directory} have the wrong shapes: {bad[:5]}")
    return tree_map_with_path(lambda path, _: flat[path], template)


def read_trainer_state(directory: str | Path) -> dict:
    """A complete checkpoint's ``trainer_state.json`` (no weights are read)."""
    directory = Path(directory)
    _check_complete(directory)
    meta = _load_json(directory / TRAINER_STATE)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory / TRAINER_STATE} is not a JSON object")
    return meta


def load_checkpoint(directory: str | Path, template: TrainState) -> tuple[TrainState, dict]:
    """Read a checkpoint into the structure of ``template``.

    Args:
        directory: a ``checkpoint-{step}`` directory.
        template: a :class:`TrainState` with the run's parameter and optimizer trees
            (values ignored; structure, shapes and dtypes are checked).

    Returns:
        ``(state, trainer_state)`` where ``trainer_state`` is the JSON saved alongside.

    Raises:
        CheckpointError: when the directory is missing, incomplete, corrupt or does not
            match the template.
    """
    directory = Path(directory)
    meta = read_trainer_state(directory)
    _load_json(directory / ADAPTER_CONFIG)
    if "step" not in meta or "key" not in meta:
        raise CheckpointError(f"{directory / TRAINER_STATE} lacks 'step' or 'key'")
    params = _fill(template.params, _load_safetensors(directory / ADAPTERS), "weights", directory)
    opt = _fill(
        template.opt_state, _load_safetensors(directory / OPTIMIZER), "optimizer state", directory
    )
    state = TrainState(
        params=params,
        opt_state=opt,
        key=mx.array(meta["key"], dtype=mx.uint32),
        step=mx.array(int(meta["step"]), dtype=mx.int32),
    )
    return state, meta


def load_extra_tree(directory: str | Path, name: str, template: Any) -> Any:
    """A tree saved with ``save_checkpoint(..., extra_trees={name: tree})``, in the
    structure of ``template``; raises :class:`CheckpointError` when absent or mismatched."""
    directory = Path(directory)
    if not (directory / name).is_file():
        raise CheckpointError(f"{directory} lacks {name}, which this run needs to resume")
    return _fill(template, _load_safetensors(directory / name), name, directory)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-{step}`` directories under ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and all((p / n).is_file() for n in REQUIRED):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path:
    """The newest complete checkpoint in ``output_dir``; raises if there is none."""
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"no complete checkpoint-* directory in {output_dir}")
    return found[-1]


def clean_partial_saves(output_dir: str | Path) -> list[Path]:
    """Remove what a process killed while saving or rotating left in ``output_dir``.

    ``.tmp-checkpoint-*`` (an unfinished save), ``.del-checkpoint-*`` (an unfinished
    rotation) and ``save_adapters``' temporary files are deleted; ``.old-checkpoint-N-*`` (killed while replacing ``checkpoint-N``)
    is renamed back when ``checkpoint-N`` is missing, else deleted. Call it only when no
    other process writes to ``output_dir``.

    Returns:
        The paths deleted or restored.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    touched = []
    for p in sorted(output_dir.iterdir()):
        if p.is_file() and re.match(rf"^\.tmp-\d+-({ADAPTERS}|{ADAPTER_CONFIG})$", p.name):
            p.unlink()  # save_adapters killed before its rename
            touched.append(p)
            continue
        m = re.match(r"^\.(tmp|del|old)-(checkpoint-\d+)-", p.name)
        if not m or not p.is_dir():
            continue
        final = output_dir / m.group(2)
        if m.group(1) == "old" and not final.exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)
        touched.append(p)
    return touched


def run_id_of(checkpoint: str | Path) -> str | None:
    """The ``run_id`` recorded in a checkpoint's ``trainer_state.json`` (``None`` if absent
    or unreadable)."""
    try:
        meta = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    run_id = meta.get("run_id") if isinstance(meta, dict) else None
    return run_id if isinstance(run_id, str) else None


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint directory; renamed first, so a kill mid-delete never leaves a
    partial ``checkpoint-N`` behind (:func:`clean_partial_saves` finishes the job)."""
    path = Path(path)
    trash = path.parent / f".del-{path.name}-{os.getpid()}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate_checkpoints(
    output_dir: str | Path, *, keep: int | None, run_id: str | None = None
) -> list[Path]:
    """Delete the oldest checkpoints so at most ``keep`` remain; returns the deleted ones.

    With ``run_id``, only that run's checkpoints count and are deleted: another run's never
    push the current run's newest ones out.
    """
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    if run_id is not None:
        found = [p for p in found if run_id_of(p) == run_id]
    doomed = found[: max(len(found) - keep, 0)]
    for p in doomed:
        remove_checkpoint(p)
    return doomed
