"""Regenerates convmixer_tf/imagenet_class_names.json offline, from two local sources.

- Class order and WordNet ids: tensorflow_datasets' `imagenet2012/labels.txt` (the 1000 ILSVRC-2012
  wnids, sorted, which is the class index order of the official and timm ConvMixer checkpoints).
- Names: WordNet 3.0 `data.noun` (Debian/Ubuntu package `wordnet-base`); an ImageNet wnid
  `nXXXXXXXX` is the byte offset of its synset in that file. The short name is the synset's first
  lemma, as in keras.applications' `imagenet_class_index.json`.

    python scripts/make_imagenet_class_names.py /usr/share/wordnet/data.noun
"""

import argparse
import json
import os
import re

import tensorflow_datasets

WORDNET_NOTICE = (
    "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND "
    "DATABASE IS PROVIDED \"AS IS\" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR "
    "WARRANTIES, EXPRESS OR IMPLIED. https://wordnet.princeton.edu/license-and-commercial-use"
)


def synset_lemmas(data_noun, wnid):
    """The lemmas of noun synset `wnid` (e.g. n01440764 -> ['tench', 'Tinca_tinca'])."""
    offset = int(wnid[1:])
    line = data_noun[offset : data_noun.index(b"\n", offset)].decode("utf-8")
    fields = line.split(" ")
    if fields[0] != wnid[1:] or fields[2] != "n":
        raise ValueError(f"{wnid} is not a noun synset at that offset of data.noun")
    count = int(fields[3], 16)
    return [fields[4 + 2 * i] for i in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_noun", help="path of WordNet 3.0 dict/data.noun")
    parser.add_argument("--output", default="convmixer_tf/imagenet_class_names.json")
    args = parser.parse_args()
    labels_path = os.path.join(
        os.path.dirname(tensorflow_datasets.__file__), "datasets", "imagenet2012", "labels.txt"
    )
    with open(labels_path, encoding="utf-8") as f:
        wnids = f.read().split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise ValueError(f"{labels_path} is not the sorted list of 1000 ILSVRC-2012 wnids")
    with open(args.data_noun, "rb") as f:
        data_noun = f.read()
    classes = []
    for wnid in wnids:
        lemmas = synset_lemmas(data_noun, wnid)
        classes.append([wnid, lemmas[0], ", ".join(l.replace("_", " ") for l in lemmas)])
    document = {
        "description": "ILSVRC-2012 (ImageNet-1k) classes in model output order: "
        "[wnid, short name, all WordNet lemmas].",
        "sources": [
            "wnids and order: tensorflow_datasets 4.9.10 datasets/imagenet2012/labels.txt",
            "names: WordNet 3.0 data.noun (Princeton University), via Debian wordnet-base",
        ],
        "wordnet_license": WORDNET_NOTICE,
        "classes": classes,
    }
    text = json.dumps(document, indent=1, ensure_ascii=False)
    # One class per line: reviewable diffs, a third of the size.
    text = re.sub(r"\[\s+(\"n\d{8}\"),\s+(\".*?\"),\s+(\".*?\")\s+\]", r"[\1, \2, \3]", text)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {len(classes)} classes to {args.output}")


if __name__ == "__main__":
    main()
