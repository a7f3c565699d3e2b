"""The demo jobs: real trained models on real data."""

from surgery.demo.tasks import (CACHE, Measured, TextTask, accuracy, measure,
                                minilm_folder_and_data, minilm_rotten_tomatoes, prepare,
                                resnet18_fashion, text_accuracy, vit_fashion)

__all__ = ["CACHE", "Measured", "TextTask", "accuracy", "measure", "minilm_folder_and_data",
           "minilm_rotten_tomatoes", "prepare", "resnet18_fashion", "text_accuracy",
           "vit_fashion"]
