"""The demo jobs: real trained models on real data (trained once here, then cached)."""

from surgery.demo.tasks import (
                                CACHE,
                                TextTask,
                                minilm_folder_and_data,
                                minilm_rotten_tomatoes,
                                prepare,
                                resnet18_fashion,
                                resnet50_fashion,
                                vit_fashion,
)

__all__ = ["CACHE", "TextTask", "minilm_folder_and_data", "minilm_rotten_tomatoes", "prepare",
           "resnet18_fashion", "resnet50_fashion", "vit_fashion"]
