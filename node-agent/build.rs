//! Generates the kubelet PodResources v1 client (the agent) and server (the tests and the e2e
//! harness serve the same proto) from `proto/api.proto`. Needs `protoc` (Debian's
//! `protobuf-compiler`).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/api.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/api.proto"], &["proto"])
}
