"""The file `mlflow.pyfunc.load_model` runs to build the encoder's pyfunc model.

MLflow's models-from-code: the registry holds this file instead of a pickled Python object,
so loading a model executes only brainmoe's own code, and safetensors remain the only
weights format (pretrain.pyfunc.log_encoder logs it).
"""

from mlflow.models import set_model

from pretrain.pyfunc import EncoderModel

set_model(EncoderModel())
