//! An ONNX graph loaded once through `tract-onnx` (pure Rust) with a fixed input shape, optimised for it, and
//! run on any number of inputs. Errors name the file.
use std::path::{Path, PathBuf};

use tract_onnx::prelude::*;

use crate::{Error, Result};

type Plan = TypedRunnableModel;

/// One loaded graph: its file, the input shape it was specialised to and the outputs' shapes.
pub struct OnnxNet {
    pub path: PathBuf,
    pub input_shape: Vec<usize>,
    plan: Arc<Plan>,
}

/// An output of [`OnnxNet::run`]: its shape and row-major values.
#[derive(Debug, Clone)]
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl OnnxNet {
    /// Reads `path`, fixes its first input to `input_shape` (f32) and checks that it has `outputs` outputs whose
    /// shapes are `expected` (None: not checked).
    pub fn load(path: &Path, input_shape: &[usize], expected: &[Option<Vec<usize>>]) -> Result<Self> {
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::weights(path, format!("{what}: {e}"));
        let model = tract_onnx::onnx().model_for_path(path).map_err(|e| fail("not a readable ONNX graph", &e))?;
        let fact = InferenceFact::dt_shape(f32::datum_type(), input_shape.iter().copied());
        let model = model.with_input_fact(0, fact).map_err(|e| fail("its input", &e))?;
        let typed =
            model.into_optimized().map_err(|e| fail(&format!("cannot run it on a {input_shape:?} input"), &e))?;
        let outputs = typed.output_outlets().map_err(|e| fail("its outputs", &e))?.to_vec();
        if outputs.len() != expected.len() {
            return Err(Error::weights(
                path,
                format!(
                    "expected {} outputs, the graph has {}: not the net this detector runs?",
                    expected.len(),
                    outputs.len()
                ),
            ));
        }
        for (i, (outlet, want)) in outputs.iter().zip(expected).enumerate() {
            let fact = typed.outlet_fact(*outlet).map_err(|e| fail("its outputs", &e))?;
            let Some(want) = want else { continue };
            let got = fact.shape.as_concrete().map(|s| s.to_vec());
            if got.as_deref() != Some(want.as_slice()) {
                return Err(Error::weights(
                    path,
                    format!(
                        "output {i} has shape {:?} on a {input_shape:?} input, expected {want:?}: not the net this \
                         detector runs?",
                        fact.shape
                    ),
                ));
            }
        }
        let plan = typed.into_runnable().map_err(|e| fail("cannot plan it", &e))?;
        Ok(Self { path: path.to_path_buf(), input_shape: input_shape.to_vec(), plan })
    }

    /// The outputs for one input of [`OnnxNet::input_shape`] (row-major f32).
    pub fn run(&self, input: Vec<f32>) -> Result<Vec<Output>> {
        let tensor = Tensor::from_shape(&self.input_shape, &input)
            .map_err(|e| Error::weights(&self.path, format!("input: {e}")))?;
        // tract's matrix products on the process's rayon pool (`--threads`), not on one thread
        let pool = tract_linalg::multithread::Executor::RayonGlobal;
        let outputs = tract_linalg::multithread::multithread_tract_scope(pool, || {
            self.plan.run(tvec!(tensor.into_tensor().into()))
        })
        .map_err(|e| Error::weights(&self.path, format!("running it: {e}")))?;
        outputs
            .iter()
            .map(|o| {
                let view =
                    o.to_plain_array_view::<f32>().map_err(|e| Error::weights(&self.path, format!("output: {e}")))?;
                Ok(Output { shape: view.shape().to_vec(), data: view.iter().copied().collect() })
            })
            .collect()
    }
}
