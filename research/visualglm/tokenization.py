"""ChatGLM-6B v1 tokenizer (the `ice_text.model` SentencePiece vocabulary) for VisualGLM-6B (spec §10).

Design: subclasses MindFormers' `PreTrainedTokenizer`, so `__call__`/`encode` get MindFormers' padding,
truncation, batching and `return_tensors` for free; `tokenize`, `decode` and the id maps are overridden so
that the whole text goes through the ChatGLM preprocessing and SentencePiece in one piece (the base class
would split the text on special-token strings and normalise the decoded text).

Every special id is read from the SentencePiece model (`piece_to_id`), never hard-coded, and shifted by
`num_image_tokens` (0 for the "slim" ChatGLM-6B that VisualGLM uses, 20000 for the old 150528-entry one).
"""
import os
import re
import shutil
from typing import List, Optional

import numpy as np
import sentencepiece as spm
from mindformers.models.tokenization_utils import PreTrainedTokenizer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from visualglm.errors import UserError

__all__ = ["ChatGLMTokenizer", "TokenIdError"]

NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"
MAX_BLANK = 80


def blank_piece(n):
    """The piece that stands for a run of `n` spaces (2 <= n <= 80)."""
    return f"<|blank_{n}|>"


_BLANK_RE = re.compile(r"<\|blank_(\d+)\|>")
_SPACE_RUN_RE = re.compile(r" {2,}")


def _spaces_to_blanks(match):
    """Replace a run of spaces the way ChatGLM does (n = 80 down to 2, longest first): full 80-space
    pieces, then one piece for the rest (a single left-over space stays a space)."""
    n = len(match.group(0))
    out = [blank_piece(MAX_BLANK)] * (n // MAX_BLANK)
    rest = n % MAX_BLANK
    if rest == 1:
        out.append(" ")
    elif rest:
        out.append(blank_piece(rest))
    return "".join(out)


class TokenIdError(UserError, IndexError):
    """A token id that is not in the vocabulary (also an IndexError, as in MindFormers)."""


def _to_py_ids(token_ids):
    """Python ints (or nested lists of them) from an int, a list, a numpy array or a MindSpore tensor."""
    if hasattr(token_ids, "asnumpy"):
        token_ids = token_ids.asnumpy()
    if isinstance(token_ids, np.ndarray):
        return token_ids.tolist()
    if isinstance(token_ids, (np.integer, int)):
        return int(token_ids)
    return [_to_py_ids(t) for t in token_ids]


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM-6B v1 tokenizer.

    Args:
        vocab_file: the SentencePiece model (`ice_text.model`).
        do_lower_case / remove_space: optional preprocessing (both off in ChatGLM-6B).
        bos_token ... unk_token: the special pieces; their ids come from the SentencePiece model.
        num_image_tokens: id offset added to every SentencePiece id (0 for VisualGLM-6B).
        padding_side: 'right' by default (MindFormers); HF ChatGLM pads on the left.
    """
    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids"]
    padding_side = "right"

    def __init__(self, vocab_file, do_lower_case=False, remove_space=False, bos_token="<sop>", eos_token="<eop>",
                 end_token="</s>", mask_token="[MASK]", gmask_token="[gMASK]", smask_token="[sMASK]",
                 pad_token="<pad>", unk_token="<unk>", num_image_tokens=0, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = self._load_sp_model(vocab_file)
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.num_image_tokens = int(num_image_tokens)
        if self.num_image_tokens < 0:
            raise UserError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        self.end_token = end_token
        self.gmask_token = gmask_token
        self.smask_token = smask_token
        self.name = "ChatGLMTokenizer"

        required = [bos_token, eos_token, mask_token, gmask_token, smask_token, pad_token, unk_token,
                    NEWLINE_PIECE, TAB_PIECE] + [blank_piece(n) for n in range(2, MAX_BLANK + 1)]
        missing = [p for p in required if not self._has_piece(p)]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise UserError(f"tokenizer model {vocab_file} lacks the ChatGLM special piece(s) {shown}: "
                            "it is not a ChatGLM-6B (ice_text) vocabulary")
        self._newline_id = self.sp_model.piece_to_id(NEWLINE_PIECE)

        extra = list(kwargs.pop("additional_special_tokens", None) or [])
        for token in (gmask_token, smask_token):
            if token not in extra:
                extra.append(token)
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, bos_token=bos_token,
                         eos_token=eos_token, end_token=end_token, mask_token=mask_token, gmask_token=gmask_token,
                         smask_token=smask_token, pad_token=pad_token, unk_token=unk_token,
                         num_image_tokens=num_image_tokens, additional_special_tokens=extra, **kwargs)

    # ----------------------------------------------------------------- vocabulary
    @staticmethod
    def _load_sp_model(vocab_file):
        if vocab_file is None:
            raise UserError("ChatGLMTokenizer needs vocab_file (the SentencePiece model ice_text.model)")
        path = os.fspath(vocab_file)
        if not os.path.isfile(path):
            raise UserError(f"tokenizer vocab file not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(path)
        except (OSError, RuntimeError) as err:
            raise UserError(f"tokenizer vocab file {path} is not a SentencePiece model: {err}") from None
        return sp

    def _has_piece(self, piece):
        pid = self.sp_model.piece_to_id(piece)
        return self.sp_model.id_to_piece(pid) == piece

    @property
    def vocab_size(self):
        """Number of ids: the image-token offset plus the SentencePiece pieces."""
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def __len__(self):
        return self.vocab_size

    def get_vocab(self):
        offset = self.num_image_tokens
        return {self.sp_model.id_to_piece(i): i + offset for i in range(self.sp_model.get_piece_size())}

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index):
        index = int(index)
        if index < 0 or index >= self.vocab_size:
            raise TokenIdError(f"token id {index} is outside the vocabulary [0, {self.vocab_size}) of "
                               f"{self.vocab_file}")
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp_model.id_to_piece(index - self.num_image_tokens)

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        ids = _to_py_ids(ids)
        if isinstance(ids, int):
            return self._convert_id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._convert_id_to_token(i) for i in ids if i not in special]

    def _token_id(self, token):
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    @property
    def gmask_token_id(self):
        return self._token_id(self.gmask_token)

    @property
    def smask_token_id(self):
        return self._token_id(self.smask_token)

    @property
    def end_token_id(self):
        return self._token_id(self.end_token)

    # ----------------------------------------------------------------- encode
    def preprocess_text(self, text):
        """The ChatGLM text preprocessing (spec §10.2 steps 1-5)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
        return _SPACE_RUN_RE.sub(_spaces_to_blanks, text)

    def tokenize(self, text, pair=None, add_special_tokens=False, add_dummy_prefix=True, **kwargs):
        """SentencePiece pieces of `text` after preprocessing. Without the dummy prefix the text is encoded
        behind a `<n>` and everything up to that `<n>` is dropped (upstream drops the first 2 pieces,
        `▁` and `<n>`; this is the same whenever `▁` is a single piece)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        text = self.preprocess_text(text)
        if add_dummy_prefix:
            return self.sp_model.encode(text, out_type=str)
        pieces = self.sp_model.encode(NEWLINE_PIECE + text, out_type=str)
        return pieces[pieces.index(NEWLINE_PIECE) + 1:]

    def _tokenize(self, text, **kwargs):
        return self.tokenize(text, **kwargs)

    def encode_text(self, text, add_dummy_prefix=True):
        """Ids of `text` without special tokens (a fast path that skips MindFormers' encode machinery)."""
        text = self.preprocess_text(text)
        offset = self.num_image_tokens
        if add_dummy_prefix:
            ids = self.sp_model.encode(text)
        else:
            ids = self.sp_model.encode(NEWLINE_PIECE + text)
            ids = ids[ids.index(self._newline_id) + 1:]
        return [i + offset for i in ids]

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None):
        """`a + [gMASK, <sop>]`, then `b + [<eop>]` for a pair (spec §10.3)."""
        out = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            out += list(token_ids_1) + [self.eos_token_id]
        return out

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        types = [0] * (len(token_ids_0) + 2)
        if token_ids_1 is not None:
            types += [1] * (len(token_ids_1) + 1)
        return types

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    # ----------------------------------------------------------------- decode
    @staticmethod
    def postprocess_text(text):
        """Undo the preprocessing: `<n>`, `<|tab|>` and `<|blank_n|>` back to whitespace."""
        text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
        return _BLANK_RE.sub(lambda m: " " * int(m.group(1)), text)

    def convert_tokens_to_string(self, tokens):
        return self.postprocess_text(self.sp_model.decode_pieces(list(tokens)))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        # skip_special_tokens / clean-up are ignored as in MindFormers: the control pieces (<sop>, <eop>,
        # [gMASK] ...) decode to empty strings, and clean-up would break round trips.
        ids = _to_py_ids(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        pad, offset, size = self.pad_token_id, self.num_image_tokens, self.vocab_size
        text_ids = []
        for i in ids:
            if i == pad:
                continue
            if i >= size:
                raise TokenIdError(f"token id {i} is outside the vocabulary [0, {size}) of {self.vocab_file}")
            if i - offset >= 0:
                text_ids.append(i - offset)
        return self.postprocess_text(self.sp_model.decode_ids(text_ids))

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """The text of a list of ids; a nested list (a batch) gives a list of texts."""
        ids = _to_py_ids(token_ids)
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            return [self._decode(seq) for seq in ids]
        return self._decode(ids)

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        return [self._decode(seq) for seq in _to_py_ids(sequences)]

    # ----------------------------------------------------------------- saving
    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
