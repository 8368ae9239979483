"""Downloads for `prepare`: a model or dataset snapshot from huggingface_hub or modelscope, resumable (both keep
partial files and continue them), each file then checked against the hub's own sha256 where it gives one."""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer.prepare import PrepareError

FROM_HINT = "download it where there is access and pass `--from DIR`"


def _unreachable(step: str, what: str, hub: str, exc: BaseException) -> PrepareError:
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    return PrepareError(f"step {step}: needs {hub} access to download {what} ({reason}); {FROM_HINT}")


def hub_files(repo: str, repo_type: str, patterns: list[str] | None) -> dict[str, tuple[int, str | None]]:
    """name → (size, sha256 or None) as the Hugging Face hub lists them (raises when unreachable)."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    api = HfApi()
    info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo, files_metadata=True)
    out = {}
    for s in info.siblings or []:
        if patterns is None or any(fnmatch(s.rfilename, p) for p in patterns):
            out[s.rfilename] = (s.size or 0, s.lfs.sha256 if s.lfs else None)
    return out


def download(step: str, repo: str, out: Path, *, hub: str = "huggingface", repo_type: str = "model",
             patterns: list[str] | None = None, hasher=None) -> None:
    """``repo`` into ``out`` (continuing partial files), then its files checked against the hub's sha256."""
    out.mkdir(parents=True, exist_ok=True)
    if hub == "modelscope":
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise PrepareError(f"step {step}: modelscope is not installed (`pip install modelscope`); "
                               f"or {FROM_HINT}") from None
        try:
            ms_download(repo, local_dir=str(out), allow_patterns=patterns,
                        repo_type=repo_type if repo_type == "dataset" else None)
        except Exception as exc:  # modelscope raises requests' and its own errors
            raise _unreachable(step, repo, "modelscope", exc) from None
        return
    from huggingface_hub import snapshot_download

    try:
        listed = hub_files(repo, repo_type, patterns)
        total = sum(size for size, _ in listed.values())
        print(f"  {repo}: {len(listed)} files, {total / 1e9:.2f} GB")
        free = shutil.disk_usage(out).free
        if total > free:
            raise PrepareError(f"step {step}: {repo} is {total / 1e9:.2f} GB, {out} has {free / 1e9:.2f} GB free; "
                               f"free some space (or move `prepared:` in matrix.yaml)")
        snapshot_download(repo, repo_type=repo_type, local_dir=out, allow_patterns=patterns)
    except PrepareError:
        raise
    except Exception as exc:  # no network, no hub access (HTTP errors, offline mode, DNS): all the same to the user
        raise _unreachable(step, repo, "Hugging Face hub", exc) from None
    from trainer.prepare.manifest import sha256_file

    bad = [name for name, (_, sha) in listed.items() if sha and sha256_file(out / name) != f"sha256:{sha}"]
    if bad:
        for name in bad:
            (out / name).unlink()
        raise PrepareError(f"step {step}: {bad[0]} differs from the hub's sha256 ({len(bad)} file(s), removed); "
                           f"run prepare again to download them anew")
