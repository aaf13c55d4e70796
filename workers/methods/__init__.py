"""What each adapter method is: spec → stock peft config, BitFit, AdaLoRA under DeepSpeed, the export math on stock
files. May import workers.storage.
"""
