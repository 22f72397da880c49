//! A package is refused, with a message naming the problem, unless checksums, names and
//! shapes agree; a good one opens.

use std::path::Path;

use flowpack::onnx::{
    tensor_shape_proto, type_proto, GraphProto, ModelProto, TensorShapeProto, TypeProto,
    ValueInfoProto, FLOAT,
};
use flowpack::*;
use prost::Message;

fn value(name: &str, event: &[i64]) -> ValueInfoProto {
    let mut dim = vec![tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimParam("N".into())),
        denotation: None,
    }];
    dim.extend(event.iter().map(|&d| tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
        denotation: None,
    }));
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(FLOAT),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        doc_string: None,
    }
}

fn model(inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>) -> Vec<u8> {
    ModelProto {
        ir_version: Some(8),
        graph: Some(GraphProto {
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Writes a consistent package for event shape `[2]` and returns its manifest.
fn write_package(dir: &Path) -> Manifest {
    let enc = model(
        vec![value("x", &[2])],
        vec![value("z", &[2]), value("log_prob", &[])],
    );
    let dec = model(vec![value("z", &[2])], vec![value("x", &[2])]);
    std::fs::write(dir.join(ENCODE_FILE), &enc).unwrap();
    std::fs::write(dir.join(DECODE_FILE), &dec).unwrap();
    let event = [2];
    let m = Manifest {
        format_version: FORMAT_VERSION,
        name: "t".into(),
        version: 1,
        family: "realnvp".into(),
        event_shape: vec![2],
        dtype: "float32".into(),
        base: Base::StandardNormal,
        graphs: Graphs::standard(
            &event,
            sha256_hex(&enc),
            sha256_hex(&dec),
            [Cost::OnePass; 2],
            false,
            0,
        ),
        domain: Domain {
            features: Some(vec!["a".into(), "b".into()]),
            ..Default::default()
        },
        metrics: Metrics::default(),
        context: None,
        reference: None,
        scoring: Scoring::default(),
        training: Training::default(),
    };
    m.write(dir).unwrap();
    m
}

fn open_err(dir: &Path) -> String {
    Package::open(dir)
        .expect_err("the package must be refused")
        .to_string()
}

#[test]
fn a_consistent_package_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_package(tmp.path());
    let p = Package::open(tmp.path()).unwrap();
    assert_eq!(p.manifest, m);
    assert_eq!(p.event_size(), 2);
    let text = std::fs::read_to_string(tmp.path().join(MANIFEST_FILE)).unwrap();
    assert!(
        text.contains("\"shape\": [\n            \"N\",\n            2"),
        "batch axis is \"N\" in JSON"
    );
}

#[test]
fn a_changed_graph_fails_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    write_package(tmp.path());
    let path = tmp.path().join(ENCODE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(0);
    std::fs::write(&path, bytes).unwrap();
    let e = open_err(tmp.path());
    assert!(e.contains("encode.onnx") && e.contains("sha256"), "{e}");
}

#[test]
fn a_graph_whose_shapes_disagree_with_the_manifest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = write_package(tmp.path());
    // The manifest claims 3 features, consistently, but the graphs take 2.
    let event = [3];
    m.event_shape = vec![3];
    m.domain.features = None;
    m.graphs.encode.inputs = vec![TensorSpec::batched("x", &event)];
    m.graphs.encode.outputs = vec![
        TensorSpec::batched("z", &event),
        TensorSpec::batched("log_prob", &[]),
    ];
    m.graphs.decode.inputs = vec![TensorSpec::batched("z", &event)];
    m.graphs.decode.outputs = vec![TensorSpec::batched("x", &event)];
    m.write(tmp.path()).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("the graph maps (x[N, 2])") && e.contains("flow.json says (x[N, 3])"),
        "{e}"
    );
}

#[test]
fn a_manifest_that_contradicts_itself_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = write_package(tmp.path());
    m.graphs.decode.outputs[0].name = "y".into();
    m.write(tmp.path()).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("graphs.decode must map (z[N, 2]) to (x[N, 2])"),
        "{e}"
    );

    let mut m = write_package(tmp.path());
    m.event_shape = vec![0];
    m.write(tmp.path()).unwrap();
    assert!(open_err(tmp.path()).contains("event_shape [0]"));

    let mut m = write_package(tmp.path());
    m.format_version = 99;
    m.write(tmp.path()).unwrap();
    assert!(open_err(tmp.path()).contains("format_version 99"));

    let mut m = write_package(tmp.path());
    m.graphs.encode.file = "../../etc/passwd".into();
    m.write(tmp.path()).unwrap();
    assert!(open_err(tmp.path()).contains("plain file name"));

    let mut m = write_package(tmp.path());
    m.domain.features = Some(vec!["a".into()]);
    m.write(tmp.path()).unwrap();
    assert!(open_err(tmp.path()).contains("domain.features names 1"));
}

#[test]
fn unreadable_manifests_and_missing_files_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(open_err(tmp.path()).contains("flow.json"));

    write_package(tmp.path());
    std::fs::remove_file(tmp.path().join(DECODE_FILE)).unwrap();
    assert!(open_err(tmp.path()).contains("decode.onnx"));

    write_package(tmp.path());
    let path = tmp.path().join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("\"name\"", "\"nmae\"", 1);
    std::fs::write(&path, text).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("not a valid manifest") && e.contains("nmae"),
        "{e}"
    );

    write_package(tmp.path());
    std::fs::write(tmp.path().join(ENCODE_FILE), b"not protobuf at all").unwrap();
    let mut m = Package::open(tmp.path())
        .map(|p| p.manifest)
        .unwrap_err()
        .to_string();
    assert!(m.contains("sha256"), "{m}");
    // With a matching checksum, the content itself is refused.
    let mut man: Manifest = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    man.graphs.encode.sha256 = sha256_hex(b"not protobuf at all");
    man.write(tmp.path()).unwrap();
    m = open_err(tmp.path());
    assert!(
        m.contains("encode.onnx") && (m.contains("not an ONNX model") || m.contains("no graph")),
        "{m}"
    );
}

#[test]
fn tail_probabilities_count_the_reference_rows_at_or_below() {
    // 10 rows with a tie at -2: (k + 1) / (n + 1).
    let lp = [-9.0, -5.0, -2.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0f32];
    let r = ReferenceSet::from_log_probs(&lp).unwrap();
    assert_eq!((r.len(), r.is_exact()), (10, true));
    let tail = |v: f32| r.tail_probability(v);
    assert_eq!(
        tail(-100.0),
        1.0 / 11.0,
        "never 0: below every reference row"
    );
    assert_eq!(tail(-9.0), 2.0 / 11.0, "at or below counts the row itself");
    assert_eq!(tail(-2.0), 5.0 / 11.0, "both tied rows count");
    assert_eq!(tail(-1.5), 5.0 / 11.0);
    assert_eq!(tail(3.0), 1.0);
    assert_eq!(tail(f32::NAN), 1.0 / 11.0);
    assert_eq!(r.quantile(0.5), -1.0, "the 5th of 10");
    assert_eq!(r.quantile(0.0), -9.0);
    assert!(ReferenceSet::from_log_probs(&[]).is_none());
    assert!(ReferenceSet::from_log_probs(&[1.0, f32::INFINITY]).is_none());

    // A sketch of 100 000 rows in 1 000 points: within 1 % of the exact count in the tail.
    let many: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
    let sketch = ReferenceSet::with_max_points(&many, 1000).unwrap();
    assert!(!sketch.is_exact());
    for k in [10u64, 100, 1000, 10_000, 99_999] {
        let got = sketch.count_at_or_below(k as f32 - 1.0);
        let err = (got as f64 - k as f64).abs() / k as f64;
        assert!(err < 0.012, "count at rank {k}: {got}");
    }
    assert_eq!(sketch.count_at_or_below(-1.0), 0);
    assert_eq!(sketch.count_at_or_below(1e9), 100_000);

    // The file round-trips, and a damaged one is refused with its path.
    let path = Path::new("reference.bin");
    let bytes = sketch.to_bytes();
    assert_eq!(ReferenceSet::from_bytes(&bytes, path).unwrap(), sketch);
    let mut bad = bytes.clone();
    let last = bad.len() - 4;
    bad[last..].copy_from_slice(&(-1e9f32).to_le_bytes());
    let e = ReferenceSet::from_bytes(&bad, path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("reference.bin") && e.contains("increasing"),
        "{e}"
    );
    let e = ReferenceSet::from_bytes(&bytes[..40], path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not hold"), "{e}");
}

#[test]
fn a_reference_set_is_covered_by_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    write_package(tmp.path());
    let mut p = Package::open(tmp.path()).unwrap();
    let set = ReferenceSet::from_log_probs(&[-3.0, -1.0, 0.0]).unwrap();
    p.set_reference(set.clone(), "three rows").unwrap();
    let again = Package::open(tmp.path()).unwrap();
    assert_eq!(again.reference.as_ref(), Some(&set));
    let r = again.manifest.reference.clone().unwrap();
    assert_eq!(
        (r.count, r.exact, r.source.as_str()),
        (3, true, "three rows")
    );

    // Another set written over the file without the manifest knowing: refused.
    let other = ReferenceSet::from_log_probs(&[-3.0, -1.0, 5.0]).unwrap();
    std::fs::write(tmp.path().join(REFERENCE_FILE), other.to_bytes()).unwrap();
    let e = open_err(tmp.path());
    assert!(e.contains("reference.bin") && e.contains("sha256"), "{e}");

    // A count that disagrees with the file: refused.
    let mut m = again.manifest.clone();
    std::fs::write(tmp.path().join(REFERENCE_FILE), set.to_bytes()).unwrap();
    m.reference.as_mut().unwrap().count = 4;
    m.write(tmp.path()).unwrap();
    assert!(open_err(tmp.path()).contains("says 4"));

    // Thresholds are tail probabilities; an exact order must order every feature.
    let mut m = again.manifest.clone();
    m.scoring.threshold = 0.0;
    m.write(tmp.path()).unwrap();
    assert!(open_err(tmp.path()).contains("scoring.threshold"));
    let mut m = again.manifest;
    m.scoring.contributions = Contributions::Exact { order: vec![0, 0] };
    m.write(tmp.path()).unwrap();
    assert!(open_err(tmp.path()).contains("order"));
}

fn wine_context() -> ContextSpec {
    ContextSpec {
        columns: vec![
            ContextColumn {
                name: "colour".into(),
                kind: ContextKind::Categorical {
                    categories: vec!["red".into(), "white".into()],
                },
            },
            ContextColumn {
                name: "quality".into(),
                kind: ContextKind::Categorical {
                    categories: vec!["3".into(), "5".into(), "8".into()],
                },
            },
            ContextColumn {
                name: "hour".into(),
                kind: ContextKind::Numeric {
                    mean: 12.0,
                    std: 6.0,
                },
            },
        ],
        embedding: None,
    }
}

#[test]
fn a_conditional_package_declares_its_context_and_both_graphs_take_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = write_package(tmp.path());
    m.context = Some(wine_context());
    m.write(tmp.path()).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("graphs.encode must map (x[N, 2], context[N, 3])")
            && e.contains("3 context columns"),
        "{e}"
    );

    // Graphs with the second input, and a manifest saying so, open.
    let enc = model(
        vec![value("x", &[2]), value("context", &[3])],
        vec![value("z", &[2]), value("log_prob", &[])],
    );
    let dec = model(
        vec![value("z", &[2]), value("context", &[3])],
        vec![value("x", &[2])],
    );
    std::fs::write(tmp.path().join(ENCODE_FILE), &enc).unwrap();
    std::fs::write(tmp.path().join(DECODE_FILE), &dec).unwrap();
    m.graphs = Graphs::standard(
        &[2],
        sha256_hex(&enc),
        sha256_hex(&dec),
        [Cost::OnePass; 2],
        false,
        3,
    );
    m.write(tmp.path()).unwrap();
    let opened = Package::open(tmp.path()).unwrap();
    assert_eq!(opened.manifest.context, Some(wine_context()));

    // A spec a client could not use is refused by name.
    for (edit, says) in [
        (
            Box::new(|c: &mut ContextSpec| c.columns[2].name = "colour".into())
                as Box<dyn Fn(&mut ContextSpec)>,
            "\"colour\" appears twice",
        ),
        (
            Box::new(|c: &mut ContextSpec| {
                c.columns[2].kind = ContextKind::Numeric {
                    mean: 0.0,
                    std: 0.0,
                }
            }),
            "positive std",
        ),
        (
            Box::new(|c: &mut ContextSpec| {
                c.columns[0].kind = ContextKind::Categorical { categories: vec![] }
            }),
            "no categories",
        ),
        (
            Box::new(|c: &mut ContextSpec| {
                c.columns[0].kind = ContextKind::Categorical {
                    categories: vec!["red".into(), "red".into()],
                }
            }),
            "category \"red\" twice",
        ),
        (
            Box::new(|c: &mut ContextSpec| c.embedding = Some(0)),
            "embedding",
        ),
    ] {
        let mut bad = m.clone();
        edit(bad.context.as_mut().unwrap());
        bad.write(tmp.path()).unwrap();
        let e = open_err(tmp.path());
        assert!(e.contains(says), "{says}: {e}");
    }
}

#[test]
fn context_values_become_what_the_graphs_take() {
    let spec = wine_context();
    let [colour, quality, hour] = &spec.columns[..] else {
        panic!()
    };
    assert_eq!(colour.graph_value(ContextValue::Text("white")), Ok(1.0));
    assert_eq!(quality.graph_value(ContextValue::Text("8")), Ok(2.0));
    // A number names the category spelled the same, never an index.
    assert_eq!(quality.graph_value(ContextValue::Number(5.0)), Ok(1.0));
    let e = quality.graph_value(ContextValue::Number(1.0)).unwrap_err();
    assert!(
        e.contains("no category \"1\"") && e.contains("3, 5, 8"),
        "{e}"
    );
    let e = colour.graph_value(ContextValue::Text("rosé")).unwrap_err();
    assert!(e.contains("\"colour\" has no category \"rosé\""), "{e}");
    assert_eq!(hour.graph_value(ContextValue::Number(13.5)), Ok(13.5));
    for bad in [ContextValue::Number(f64::NAN), ContextValue::Number(1e300)] {
        let e = hour.graph_value(bad).unwrap_err();
        assert!(e.contains("\"hour\" must be a finite float32"), "{e}");
    }
    let e = hour.graph_value(ContextValue::Text("noon")).unwrap_err();
    assert!(e.contains("\"hour\" is numeric"), "{e}");
    assert_eq!(spec.width(), 3);
    assert_eq!(spec.encoded_width(), 2 + 3 + 1);
    assert_eq!(spec.column("hour").map(|(i, _)| i), Some(2));
}
