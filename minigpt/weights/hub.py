"""Checkpoints from the HuggingFace hub: the local cache first, the network only when it can answer."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import OFFLINE_MODEL
from ..errors import CheckpointError, HubError, HubUnreachableError
from .reading import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, index_shards


def hub_directory(repo_id: str) -> Path:
    """Directory holding config.json and the safetensors weights of a hub model (a cache snapshot).

    The local cache is tried first, so a cached model loads without touching the network;
    otherwise the files are downloaded (unless HF_HUB_OFFLINE=1).
    """
    try:
        return _hub_fetch(repo_id, local_only=True)
    except HubUnreachableError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or not _resolves(constants.ENDPOINT):
            raise  # no network: fail now rather than after the hub client's retries
    return _hub_fetch(repo_id, local_only=False)


def _resolves(url: str) -> bool:
    """Whether the hub's host name resolves (False at once on a machine without a network)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy resolves names for us
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
    except (socket.gaierror, UnicodeError, TypeError):
        return False
    return True


def _hub_fetch(repo_id: str, local_only: bool) -> Path:
    import huggingface_hub as hub
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)

    def fetch(filename: str) -> Path:
        return Path(hub.hf_hub_download(repo_id, filename, local_files_only=local_only))

    try:
        config = fetch(CONFIG_FILE)
        try:
            fetch(WEIGHTS_FILE)
        except (RemoteEntryNotFoundError, LocalEntryNotFoundError) as missing:
            try:  # a sharded checkpoint
                index = fetch(INDEX_FILE)
            except (RemoteEntryNotFoundError, LocalEntryNotFoundError):
                raise missing from None
            for shard in index_shards(index):
                fetch(shard)
    except LocalEntryNotFoundError as e:
        raise HubUnreachableError(
            f"cannot get {repo_id!r}: the hub is unreachable (offline, or HF_HUB_OFFLINE=1) and the model "
            f"is not in the local cache. On a connected machine run `minigpt download {repo_id} DIR` "
            "and pass DIR instead of the name; or use the small model trained by minigpt that ships with it "
            f"(`--model {OFFLINE_MODEL}`, `--trained-if-offline`, GPT.from_pretrained('{OFFLINE_MODEL}')), or random weights of "
            "the same shape (`--random-if-offline`, GPT.random(size))") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"no model {repo_id!r} on the hub (or it is private); check the name, "
                       "e.g. 'gpt2', 'gpt2-medium', 'distilgpt2', or pass a local directory") from e
    except RemoteEntryNotFoundError as e:
        raise CheckpointError(f"hub model {repo_id!r} has no {WEIGHTS_FILE}; minigpt reads safetensors "
                              "only and never unpickles .bin files: convert it to safetensors first") from e
    except HfHubHTTPError as e:
        raise HubError(f"the hub refused {repo_id!r}: {e}") from e
    except ValueError as e:  # a malformed repo id
        raise HubError(f"{repo_id!r} is neither a local directory nor a valid hub name ({e})") from e
    return config.parent
