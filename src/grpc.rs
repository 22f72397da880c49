//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, on
//! `--grpc-port`): the same v2 models, checks, batcher and metrics as the REST routes
//! ([`crate::api::v2`]), with gRPC health (`grpc.health.v1`) and reflection. Inputs come as
//! `raw_input_contents` (what `tritonclient.grpc` sends) or typed contents; outputs go back
//! as `raw_output_contents`, which is all `tritonclient` reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};

use crate::api::call::Call;
use crate::api::handlers::ready;
use crate::api::record::{observe, InFlightGuard, Scope};
use crate::api::tensor::{self, Data, DataType, Input, OutData};
use crate::api::v2::{self, InferCall};
use crate::api::{ApiError, AppState};
use crate::metrics::Endpoint;

/// The code generated from `proto/grpc_predict_v2.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("inference");

    /// The file descriptor set, for reflection.
    pub const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/grpc_predict_v2.bin"));
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::infer_parameter::ParameterChoice;
use proto::model_infer_response::InferOutputTensor;
use proto::*;

/// The service over the server's shared state.
pub struct Service {
    state: Arc<AppState>,
}

/// The gRPC status of an API error: the HTTP status's gRPC twin, with the same message.
fn status(e: &ApiError) -> Status {
    let code = match e.status().as_u16() {
        400 | 413 | 415 | 422 => Code::InvalidArgument,
        404 => Code::NotFound,
        409 => Code::FailedPrecondition,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn version(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}

/// The inputs of a gRPC request, from raw bytes (all of them) or typed contents.
fn inputs(req: &mut ModelInferRequest) -> Result<Vec<Input>, ApiError> {
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(ApiError::Malformed(format!(
            "raw_input_contents has {} entries for {} inputs; send one per input",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut out = Vec::with_capacity(req.inputs.len());
    for (k, t) in req.inputs.iter_mut().enumerate() {
        let name = t.name.clone();
        let bad = |msg: String| ApiError::Malformed(format!("input {name:?}: {msg}"));
        let datatype = DataType::parse(&t.datatype).ok_or_else(|| {
            bad(format!(
                "datatype {:?} is not one this server reads (FP32, FP64, INT32, INT64, UINT32, UINT64)",
                t.datatype
            ))
        })?;
        let shape: Vec<usize> = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| bad(format!("dimension {d} is negative"))))
            .collect::<Result<_, _>>()?;
        let data = match (raw.get(k), t.contents.take()) {
            (Some(bytes), _) => {
                if bytes.len() % datatype.size() != 0 {
                    return Err(bad(format!(
                        "{} raw bytes are not a whole number of {} elements",
                        bytes.len(),
                        datatype.as_str()
                    )));
                }
                tensor::from_bytes(bytes, datatype)
            }
            (None, Some(c)) => match datatype {
                DataType::Fp32 => Data::F32(c.fp32_contents),
                DataType::Fp64 => Data::F64(c.fp64_contents),
                DataType::Int32 => Data::Int(c.int_contents.into_iter().map(i128::from).collect()),
                DataType::Int64 => {
                    Data::Int(c.int64_contents.into_iter().map(i128::from).collect())
                }
                DataType::Uint32 => {
                    Data::Int(c.uint_contents.into_iter().map(i128::from).collect())
                }
                DataType::Uint64 => {
                    Data::Int(c.uint64_contents.into_iter().map(i128::from).collect())
                }
            },
            (None, None) => return Err(bad("has no contents and no raw_input_contents".into())),
        };
        out.push(tensor::checked(Input {
            name,
            shape,
            datatype,
            data,
        })?);
    }
    Ok(out)
}

fn parameter(v: &serde_json::Value) -> Option<InferParameter> {
    let choice = match v {
        serde_json::Value::Bool(b) => ParameterChoice::BoolParam(*b),
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => ParameterChoice::Uint64Param(u),
            (_, Some(i), _) => ParameterChoice::Int64Param(i),
            (_, _, Some(f)) => ParameterChoice::DoubleParam(f),
            _ => return None,
        },
        serde_json::Value::String(s) => ParameterChoice::StringParam(s.clone()),
        _ => return None,
    };
    Some(InferParameter {
        parameter_choice: Some(choice),
    })
}

impl Service {
    /// Runs `f` as one request of `endpoint`, counted like an HTTP request.
    async fn measured<T, F>(
        &self,
        endpoint: Endpoint,
        f: impl FnOnce(Call) -> F,
    ) -> Result<T, Status>
    where
        F: std::future::Future<Output = Result<T, ApiError>>,
    {
        let started = Instant::now();
        let scope = Arc::new(Scope::default());
        let _in_flight = InFlightGuard::new(&self.state.metrics.in_flight);
        let result = f(Call::detached(self.state.clone(), scope.clone())).await;
        observe(
            &self.state,
            endpoint,
            &scope,
            started.elapsed(),
            result.as_ref().err(),
        );
        result.map_err(|e| status(&e))
    }

    fn call(&self) -> Call {
        Call::detached(self.state.clone(), Arc::new(Scope::default()))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: ready(&self.state).is_ok(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        match v2::model_is_ready(&self.call(), &self.state, r.name, version(r.version)) {
            Ok(()) => Ok(Response::new(ModelReadyResponse { ready: true })),
            Err(e @ ApiError::UnknownModel(_)) | Err(e @ ApiError::NoRoute(_)) => Err(status(&e)),
            Err(_) => Ok(Response::new(ModelReadyResponse { ready: false })),
        }
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: v2::SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let m = v2::describe(&self.call(), r.name, version(r.version)).map_err(|e| status(&e))?;
        let tensors = |list: Vec<v2::TensorMeta>| {
            list.into_iter()
                .map(|t| model_metadata_response::TensorMetadata {
                    name: t.name.into(),
                    datatype: t.datatype.into(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: m.name,
            versions: m.versions,
            platform: m.platform.into(),
            inputs: tensors(m.inputs),
            outputs: tensors(m.outputs),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let timeout = Duration::from_millis(self.state.config.request_timeout_ms);
        let mut r = req.into_inner();
        self.measured(Endpoint::Infer, |call| async move {
            let deadline = Instant::now() + timeout;
            let inputs = inputs(&mut r)?;
            let outputs =
                (!r.outputs.is_empty()).then(|| r.outputs.iter().map(|o| o.name.clone()).collect());
            let answer = v2::run(
                &call,
                deadline,
                InferCall {
                    model: r.model_name,
                    version: version(r.model_version),
                    inputs,
                    outputs,
                },
            )
            .await?;
            let mut tensors = Vec::new();
            let mut raw = Vec::new();
            for (name, shape, data) in answer.outputs() {
                let (datatype, bytes) = match data {
                    OutData::F32(v) => (
                        "FP32",
                        v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
                    ),
                    OutData::F64(v) => ("FP64", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                };
                tensors.push(InferOutputTensor {
                    name: name.into(),
                    datatype: datatype.into(),
                    shape: shape.iter().map(|&d| d as i64).collect(),
                    parameters: HashMap::new(),
                    contents: None,
                });
                raw.push(bytes);
            }
            let parameters = answer
                .parameters
                .as_ref()
                .and_then(|p| p.as_object())
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), parameter(v)?)))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Response::new(ModelInferResponse {
                model_name: answer.model,
                model_version: answer.version.to_string(),
                id: r.id,
                parameters,
                outputs: tensors,
                raw_output_contents: raw,
            }))
        })
        .await
    }
}

/// Serves the gRPC API on `listener` until `shutdown` resolves: the inference service, its
/// health (SERVING once the models are loaded, NOT_SERVING while draining) and reflection.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let service_name = "inference.GRPCInferenceService";
    let watched = state.clone();
    let health_task = tokio::spawn(async move {
        let mut serving = None;
        loop {
            let now = ready(&watched).is_ok();
            if serving != Some(now) {
                let s = if now {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("", s).await;
                reporter.set_service_status(service_name, s).await;
                serving = Some(now);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTOR)
        .build_v1()?;
    let max = state.config.max_body_bytes;
    let inference = GrpcInferenceServiceServer::new(Service { state })
        .max_decoding_message_size(max)
        .max_encoding_message_size(usize::MAX);
    let incoming = tokio_stream_incoming(listener);
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(inference)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    health_task.abort();
    result.map_err(Into::into)
}

/// The listener's connections as the stream tonic serves.
fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((next, l))
    })
}
