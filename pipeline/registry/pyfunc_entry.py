"""MLflow "model from code" entry: loading the registered model runs this file, never unpickles an object."""

import mlflow.models

from pipeline.registry.pyfunc import UNetPyfunc

mlflow.models.set_model(UNetPyfunc())
