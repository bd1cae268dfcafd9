"""The benchmarks' MLServer peer: the small custom runtime a user writes to
serve an ONNX model with MLServer 1.7 (KServe v2 over HTTP). The model's
file is `parameters.uri` in its model-settings.json."""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        self.session = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outputs = self.session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(o.name, v) for o, v in zip(self.session.get_outputs(), outputs)],
        )
