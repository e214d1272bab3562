//! ONNX graphs (in progress).
use crate::error::Error;
use crate::model::Graph;
use crate::tensor::Tensor;
/// A loaded ONNX model.
pub struct Model;
impl Model {
    /// Loads a model.
    pub fn load(_bytes: &[u8]) -> Result<Model, Error> { Err(Error::Unsupported("onnx".into())) }
}
impl Graph for Model {
    fn signature(&self) -> String { String::new() }
    fn run(&self, _inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, Error> { Err(Error::Unsupported("onnx".into())) }
}
