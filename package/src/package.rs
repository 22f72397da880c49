//! Reading, checking and writing a package folder.

use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::manifest::{Cost, Dim, Graph, Graphs, Manifest, TensorSpec, MANIFEST_FILE};
use crate::{onnx, PackageError, ReferenceSet, FORMAT_VERSION};

/// A model package whose manifest, checksums and graph signatures have been checked.
#[derive(Debug, Clone)]
pub struct Package {
    /// The package folder.
    pub dir: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The reference set, when the manifest names one (checked against its sha256).
    pub reference: Option<ReferenceSet>,
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read(path: &Path) -> Result<Vec<u8>, PackageError> {
    std::fs::read(path).map_err(|source| PackageError::Io {
        path: path.to_owned(),
        source,
    })
}

impl Package {
    /// Reads `dir/flow.json` and checks the whole package: format version, event shape,
    /// each graph's sha256, that each ONNX file's inputs and outputs have the names,
    /// element type and shapes the manifest states (`[N, ...event]`, `log_prob` as `[N]`),
    /// and the reference set's sha256, size and order.
    pub fn open(dir: impl AsRef<Path>) -> Result<Package, PackageError> {
        let dir = dir.as_ref().to_owned();
        let path = dir.join(MANIFEST_FILE);
        let bytes = read(&path)?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| PackageError::Json {
                path: path.clone(),
                source,
            })?;
        manifest.check(&path)?;
        for graph in [&manifest.graphs.encode, &manifest.graphs.decode] {
            check_graph_file(&dir, graph)?;
        }
        let reference = match &manifest.reference {
            None => None,
            Some(r) => {
                let path = dir.join(&r.file);
                let bytes = read(&path)?;
                check_sha256(&path, &bytes, &r.sha256)?;
                let set = ReferenceSet::from_bytes(&bytes, &path)?;
                if set.len() != r.count || set.is_exact() != r.exact {
                    return Err(PackageError::invalid(
                        &path,
                        format!(
                            "the file holds {} rows ({}) but flow.json says {} ({})",
                            set.len(),
                            if set.is_exact() { "exact" } else { "a sketch" },
                            r.count,
                            if r.exact { "exact" } else { "a sketch" }
                        ),
                    ));
                }
                Some(set)
            }
        };
        Ok(Package {
            dir,
            manifest,
            reference,
        })
    }

    /// Stores `set` as the package's reference set (`source` says what the rows were):
    /// writes `reference.bin` and the manifest that names it.
    pub fn set_reference(&mut self, set: ReferenceSet, source: &str) -> Result<(), PackageError> {
        let bytes = set.to_bytes();
        let path = self.dir.join(crate::REFERENCE_FILE);
        std::fs::write(&path, &bytes).map_err(|source| PackageError::Io { path, source })?;
        self.manifest.reference = Some(crate::Reference {
            file: crate::REFERENCE_FILE.into(),
            sha256: sha256_hex(&bytes),
            count: set.len(),
            exact: set.is_exact(),
            source: source.into(),
        });
        self.manifest.write(&self.dir)?;
        self.reference = Some(set);
        Ok(())
    }

    /// Path of a file inside the package.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The number of scalars in one example.
    pub fn event_size(&self) -> usize {
        self.manifest.event_shape.iter().product()
    }
}

impl Manifest {
    /// Checks what the manifest says about itself (no files are read).
    pub fn check(&self, path: &Path) -> Result<(), PackageError> {
        let bad = |m: String| Err(PackageError::invalid(path, m));
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.event_shape.is_empty() || self.event_shape.contains(&0) {
            return bad(format!(
                "event_shape {:?} must be [D] or [C, H, W] with every size positive",
                self.event_shape
            ));
        }
        if self.dtype != "float32" {
            return bad(format!(
                "dtype {:?} is not supported; use \"float32\"",
                self.dtype
            ));
        }
        let event = &self.event_shape;
        let d: usize = event.iter().product();
        let order = self.scoring.contributions.order();
        if let Some(problem) = self.context.as_ref().and_then(|c| c.problem()) {
            return bad(problem);
        }
        let standard = Graphs::standard(
            event,
            String::new(),
            String::new(),
            [Cost::OnePass; 2],
            order.is_some(),
            self.context.as_ref().map_or(0, |c| c.width()),
        );
        if let Some(order) = order {
            let mut sorted = order.to_vec();
            sorted.sort_unstable();
            if event.len() != 1 || sorted != (0..d).collect::<Vec<_>>() {
                return bad(format!(
                    "scoring.contributions.exact.order must order the {d} features of a tabular model; it is {order:?}"
                ));
            }
        }
        let want = [
            ("graphs.encode", &self.graphs.encode, &standard.encode),
            ("graphs.decode", &self.graphs.decode, &standard.decode),
        ];
        for (field, graph, expected) in want {
            let (inputs, outputs) = (&expected.inputs, &expected.outputs);
            if graph.inputs != *inputs || graph.outputs != *outputs {
                return bad(format!(
                    "{field} must map {} to {}, as event_shape {:?} and {} imply; it says {} to {}",
                    show(inputs),
                    show(outputs),
                    event,
                    match &self.context {
                        Some(c) => format!("{} context columns", c.width()),
                        None => "no context".into(),
                    },
                    show(&graph.inputs),
                    show(&graph.outputs)
                ));
            }
            if graph.file.contains('/') || graph.file.contains('\\') || graph.file.starts_with('.')
            {
                return bad(format!(
                    "{field}.file {:?} must be a plain file name in the package folder",
                    graph.file
                ));
            }
        }
        let t = self.scoring.threshold;
        if !(t > 0.0 && t <= 1.0) {
            return bad(format!(
                "scoring.threshold must be a tail probability in (0, 1]; it is {t}"
            ));
        }
        if let Some(r) = &self.reference {
            if r.file.contains('/') || r.file.contains('\\') || r.file.starts_with('.') {
                return bad(format!(
                    "reference.file {:?} must be a plain file name in the package folder",
                    r.file
                ));
            }
        }
        if let Some(features) = &self.domain.features {
            if features.len() != self.event_shape.iter().product::<usize>() {
                return bad(format!(
                    "domain.features names {} features but event_shape {:?} has {}",
                    features.len(),
                    event,
                    self.event_shape.iter().product::<usize>()
                ));
            }
        }
        Ok(())
    }

    /// Writes `dir/flow.json`, pretty-printed.
    pub fn write(&self, dir: &Path) -> Result<(), PackageError> {
        let path = dir.join(MANIFEST_FILE);
        let mut text = serde_json::to_string_pretty(self).map_err(|source| PackageError::Json {
            path: path.clone(),
            source,
        })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|source| PackageError::Io { path, source })
    }
}

fn show(specs: &[TensorSpec]) -> String {
    let one = |s: &TensorSpec| {
        let dims: Vec<String> = s
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => n.to_string(),
                Dim::Dynamic(p) => p.clone(),
            })
            .collect();
        format!("{}[{}]", s.name, dims.join(", "))
    };
    let all: Vec<String> = specs.iter().map(one).collect();
    format!("({})", all.join(", "))
}

fn check_sha256(path: &Path, bytes: &[u8], expected: &str) -> Result<(), PackageError> {
    let actual = sha256_hex(bytes);
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(PackageError::Checksum {
            path: path.to_owned(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

fn check_graph_file(dir: &Path, graph: &Graph) -> Result<(), PackageError> {
    let path = dir.join(&graph.file);
    let bytes = read(&path)?;
    check_sha256(&path, &bytes, &graph.sha256)?;
    let model = onnx::ModelProto::decode(bytes.as_slice())
        .map_err(|e| PackageError::invalid(&path, format!("not an ONNX model: {e}")))?;
    let g = model
        .graph
        .ok_or_else(|| PackageError::invalid(&path, "the ONNX model has no graph"))?;
    let found_in = signature(&g.input, &g.initializer, &path)?;
    let found_out = signature(&g.output, &[], &path)?;
    if found_in != graph.inputs || found_out != graph.outputs {
        return Err(PackageError::invalid(
            &path,
            format!(
                "the graph maps {} to {} but flow.json says {} to {}",
                show(&found_in),
                show(&found_out),
                show(&graph.inputs),
                show(&graph.outputs)
            ),
        ));
    }
    Ok(())
}

/// The float32 inputs or outputs of a graph as specs; initializers listed as inputs are skipped.
fn signature(
    values: &[onnx::ValueInfoProto],
    initializers: &[onnx::TensorProto],
    path: &Path,
) -> Result<Vec<TensorSpec>, PackageError> {
    let mut out = Vec::new();
    for v in values {
        let name = v.name().to_string();
        if initializers.iter().any(|t| t.name() == name) {
            continue;
        }
        let tensor = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(onnx::type_proto::Value::TensorType(t)) => t,
            None => {
                return Err(PackageError::invalid(
                    path,
                    format!("graph value {name:?} is not a tensor"),
                ))
            }
        };
        if tensor.elem_type() != onnx::FLOAT {
            return Err(PackageError::invalid(
                path,
                format!(
                    "graph value {name:?} has element type {} but packages are float32",
                    tensor.elem_type()
                ),
            ));
        }
        let dims = tensor
            .shape
            .as_ref()
            .map(|s| s.dim.as_slice())
            .unwrap_or(&[]);
        let shape = dims
            .iter()
            .map(|d| match &d.value {
                Some(onnx::tensor_shape_proto::dimension::Value::DimValue(n)) if *n > 0 => {
                    Ok(Dim::Fixed(*n as usize))
                }
                Some(onnx::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                    Ok(Dim::Dynamic(p.clone()))
                }
                _ => Err(PackageError::invalid(
                    path,
                    format!("graph value {name:?} has an unknown or non-positive dimension"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(TensorSpec { name, shape });
    }
    Ok(out)
}
