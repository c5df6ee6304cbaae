"""The 2-core-CPU budget of `jkd demo`, shared with `benchmarks/results_tables.py --scale cpu`.

Each name is a tuple of `a.b=value` overrides (as after `--config.` on the command line) for the
Fashion-MNIST configs, so that the demo and the CPU-scale result tables train the same recipes
(docs/results.md). Plain strings: the tables script reads them without importing jax.
"""

# Short runs learn faster without augmentation.
NO_AUG = ('data.crop_padding=0', 'data.flip=false')
# The resnet8_s students (from scratch and distilled alike): 0.7 epoch at batch 64.
STUDENT = NO_AUG + ('num_epochs=0.7', 'batch_size=64', 'optim.lr=2e-3', 'optim.warmup_steps=100')
# 16 tokens of 7x7 pixels, width 64, depth 4: 1,350-1,700 examples/s on 2 cores.
VIT = ('model.name=vit_micro_p7',)
# MAE or SimMIM pretraining of that ViT: 600 steps x 128 (about 1.3 epochs).
MIM_PRETRAIN = VIT + ('total_steps=600', 'batch_size=128', 'optim.lr=4e-3',
                      'optim.lr_batch_base=0', 'optim.warmup_steps=50')
MAE_DECODER = ('model.decoder_width=64', 'model.decoder_depth=1', 'model.decoder_heads=2')
# Fine-tuning the pretrained encoder (configs/fashion_mnist/finetune.py); epochs set by the user.
FINETUNE = VIT + NO_AUG + ('model.drop_path=0.0', 'optim.layer_decay=0.85', 'optim.lr=3e-3',
                           'optim.warmup_steps=100')
