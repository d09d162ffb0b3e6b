"""The embedded demo model: a small VisualGLM of the exact architecture, trained by the project's own finetune
code on synthetic shape scenes the project generates (see README "Quick start").

    generate_data.py   the scenes and their bilingual question/answer pairs (train, held-out, LoRA concept)
    tokenizer.py       a ChatGLM-style SentencePiece model trained on the generated text
    train_demo.py      data -> tokenizer -> full-parameter stage -> LoRA stage -> evaluation -> shipped files
    evaluate.py        exact-match accuracy per question type and language on a held-out split
"""
