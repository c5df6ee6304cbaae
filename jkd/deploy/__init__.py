"""Deployable files out of a trained classifier: ONNX, LiteRT (.tflite) and StableHLO.

  jkd export --workdir W --format onnx|tflite|stablehlo [--int8] --out FILE
  jkd eval   --export FILE [--workdir W | --config C] [--split test]
  jkd bench  --export FILE [--threads 1] [--batch-sizes 1 32]

`classifier` reads a workdir's model (channel-pruned runs are made physically narrower there);
`calibration` draws the deterministic calibration batches of the training set; `onnx`, `litert`
and `stablehlo` write the files; `runtime` runs a file in its own runtime (ONNX Runtime, the
LiteRT interpreter, jax.export) for evaluation and latency, after `exported_file` has read and
checked FILE and FILE.json and `probe` has run an .onnx / .tflite file in a forked child;
`export` ties them together.
Every file takes float32 pixels (B, H, W, C) in [0, 255] and returns float32 logits: the
dataset's normalisation is inside the graph, so a deployment feeds raw images.
The converters are optional extras (`pip install 'jkd[deploy]'`, `'jkd[litert]'`); docs/deploy.md
says why each was chosen.
"""
