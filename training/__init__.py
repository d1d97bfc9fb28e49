"""Training the embedded default model pair: corpus, tokenizer, target pre-training, drafter distillation.

`corpus.py` picks the Python standard library's own sources and splits them by file, `bpe.py` trains the
byte-level BPE tokenizer on the training files, `train.py` trains the target, distills the drafter from it
and exports both as Hugging Face directories with a `manifest.json` (`python main.py task=train`).
"""
