"""The file `mlflow.pyfunc.load_model` runs to build a finetune output's pyfunc model
(MLflow's models-from-code, as pretrain/pyfunc_entry.py; finetune.pyfunc.log_heads logs it)."""

from mlflow.models import set_model

from finetune.pyfunc import HeadsModel

set_model(HeadsModel())
