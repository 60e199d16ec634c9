"""`FusionSaveLoadMixin`: `save_pretrained`, `from_pretrained` and `push_to_hub` of the fused models (`FusedUNet`,
`FusedTransformer`), one implementation for both (`serialization.py` writes, `fusion_loading.py` reads)."""

import os
import tempfile
from typing import Any, Dict, Optional, Sequence, Union


class FusionSaveLoadMixin:
    r"""
    Saving and loading for fused models, in the layouts of `loaders/serialization.py`: self-contained folders (each
    member a standard Diffusers folder; LoRA fusions as their base once plus one LoRA folder per member) or
    reference-only configs, written crash-safe, with the sha256 of every file. Put it before `ModelMixin` in the bases
    (it replaces `ModelMixin`'s methods).
    """

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        is_main_process: bool = True,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Union[int, str] = "10GB",
        push_to_hub: bool = False,
        reference_only: bool = False,
        member_sources: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
        **kwargs: Any,
    ) -> None:
        r"""
        Saves the fusion into `save_directory`, crash-safe: after a failure or a crash at any instant the folder holds
        the complete earlier save or the complete new one. Other files in the folder are left alone.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write (created if needed).
            safe_serialization (`bool`, defaults to `True`): safetensors, or `.bin` files with `False`.
            variant (`str`, *optional*): weight files named `*.{variant}.*`, as Diffusers names them.
            reference_only (`bool`, defaults to `False`): write only `config.json`, naming each member's repo id or
                path (from `member_sources`, or recorded when the members were loaded by path or id) instead of
                writing each member as a standard Diffusers folder `member_{i}.diffusers/`.
            member_sources (`list[dict]`, *optional*): per member, `pretrained_model_name_or_path`, `subfolder`,
                `revision`, `variant`.
            push_to_hub (`bool`): also upload to the Hub (`repo_id` in kwargs, default: the folder's name).
        """
        from .serialization import save_fusion

        if not is_main_process:
            return
        save_fusion(self, os.fspath(save_directory), reference_only=reference_only, member_sources=member_sources,
                    variant=variant, max_shard_size=max_shard_size, safe_serialization=safe_serialization)  # fmt: skip
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            self.push_to_hub(repo_id, reference_only=reference_only, member_sources=member_sources, variant=variant,
                             safe_serialization=safe_serialization, **kwargs)  # fmt: skip

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> Any:
        r"""
        Loads a fusion from a local folder or a Hub repo id (self-contained or reference-only layout).

        Takes `subfolder`, `revision`, `variant`, `torch_dtype`, `device_map` (one for all members, or a list with one
        per member), `cache_dir`, `token`, `local_files_only`, `use_safetensors` and the other keyword arguments
        Diffusers' pipeline loader passes, and:

        - `verify_weights` (default `True`): check every saved file against the sha256 its config records (one extra
          read of the weights; `False` skips it for very large members);
        - `allow_outside_paths` (default `False`): let a local reference-only config name member paths outside its
          folder's parent folder (a config from the Hub may only name Hub repos);
        - `allow_pickle` (default `None`, as Diffusers): `False` reads safetensors only. `.bin` files are always read
          with torch's `weights_only=True` loader; a file that would need full unpickling is refused.
        """
        from .fusion_loading import load_fusion

        return load_fusion(cls, os.fspath(pretrained_model_name_or_path), **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        reference_only: bool = False,
        member_sources: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        variant: Optional[str] = None,
        **kwargs: Any,
    ) -> str:
        """Uploads the fusion (or, with `reference_only=True`, only its weight config) to a Hub repo; returns its id."""
        from huggingface_hub import create_repo, upload_folder

        save_kwargs = {key: kwargs.pop(key) for key in ("safe_serialization", "max_shard_size") if key in kwargs}
        if kwargs:
            raise TypeError(f"push_to_hub got unexpected keyword arguments {sorted(kwargs)}")
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "fusion")
            self.save_pretrained(folder, reference_only=reference_only, member_sources=member_sources, variant=variant,
                                 **save_kwargs)  # fmt: skip
            upload_folder(repo_id=repo_id, folder_path=folder, token=token, create_pr=create_pr,
                          commit_message=commit_message or f"Upload {type(self).__name__}")  # fmt: skip
        return repo_id
