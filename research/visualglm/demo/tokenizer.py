"""The demo model's tokenizer: a small SentencePiece (BPE) model of the ChatGLM-6B layout (the pieces of ice_text.model
that ChatGLMTokenizer requires: <unk> <s> </s> <pad> at 0..3, <n>, <|tab|>, <|blank_2..80|>, [MASK], [gMASK],
[sMASK], <sop>, <eop> ...; byte fallback for any other text), trained on the generated questions and answers and
the prompt template. It is loaded through the same `visualglm.tokenization.ChatGLMTokenizer` as the real one.

    python research/visualglm/demo/tokenizer.py --out demo/weights/demo_tokenizer.model --seed 0
"""
import argparse
import io
import os

from visualglm.fileio import atomic_write

USER_SYMBOLS = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
CONTROL_SYMBOLS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
# The prompt template around the image slots and the question (processing.build_prompt), with "\n" as <n>.
TEMPLATE_LINES = ["<img>", "</img>", "问：", "<n>答：", "Q:", "<n>A:"]
# Training text is cut at these Chinese words (and between other CJK characters), so that no piece crosses a
# word: "绿色的三角形" is encoded as 绿色 / 的 / 三角形, never as one colour-and-shape piece.
DELIMITER = "\u2063"   # invisible separator; SentencePiece's pretokenization_delimiter, absent from the text
ZH_WORDS = ("图中", "没有", "描述", "这张", "图片", "里", "什么", "颜色", "形状", "物体", "几个", "是")


def _segment(line, words):
    """The line with DELIMITER between Chinese words (longest match from `words`, else one character)."""
    out, i = [], 0
    while i < len(line):
        if "\u4e00" <= line[i] <= "\u9fff":
            match = next((w for w in sorted(words, key=len, reverse=True) if line.startswith(w, i)), line[i])
            out += [DELIMITER, match, DELIMITER]
            i += len(match)
        else:
            out.append(line[i])
            i += 1
    return "".join(out).replace(DELIMITER * 2, DELIMITER).strip(DELIMITER)


def train_tokenizer(lines, out_path, words=(), vocab_size=640, seed=1234):
    """Train the SentencePiece model on `lines` (plus the template) and write it to out_path; `words` are the
    Chinese words no piece may cross (besides ZH_WORDS). Deterministic, to the byte, for the same lines (single
    thread, fixed seed, no sampling)."""
    import sentencepiece as spm
    spm.set_random_generator_seed(seed)
    words = tuple(words) + ZH_WORDS
    corpus = list(TEMPLATE_LINES) + [_segment(line.replace("\n", "<n>"), words) for line in lines]
    model = io.BytesIO()   # from memory to memory: no temporary path ends up in the model's trainer spec
    with open(os.devnull, "w") as sink:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
            user_defined_symbols=USER_SYMBOLS, control_symbols=CONTROL_SYMBOLS,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            pretokenization_delimiter=DELIMITER, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            minloglevel=2, logstream=sink)
    with atomic_write(out_path) as tmp, open(tmp, "wb") as f:
        f.write(model.getvalue())
    return out_path


def main(argv=None):
    from visualglm.demo.generate_data import chinese_words, corpus_lines
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="the .model file to write")
    parser.add_argument("--seed", type=int, default=0, help="data seed (the text of every split)")
    parser.add_argument("--vocab_size", type=int, default=640)
    args = parser.parse_args(argv)
    path = train_tokenizer(corpus_lines(args.seed), args.out, chinese_words(), args.vocab_size)
    from visualglm.tokenization import ChatGLMTokenizer
    print(f"wrote {path}: {ChatGLMTokenizer(path).vocab_size} ids")


if __name__ == "__main__":
    main()
