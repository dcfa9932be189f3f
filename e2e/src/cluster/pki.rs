//! Certificates and keys for the local control plane, made with the `openssl` CLI.
//!
//! One CA signs the API server's serving certificate (SANs 127.0.0.1, localhost) and the client
//! certificates of the admin (`O=system:masters`), the controller manager and the scheduler.
//! The service-account signing key is a separate RSA key pair.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Paths of everything generated in the PKI directory.
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (PEM).
    pub ca_crt: PathBuf,
    /// CA key.
    pub ca_key: PathBuf,
    /// API server serving certificate.
    pub serving_crt: PathBuf,
    /// API server serving key.
    pub serving_key: PathBuf,
    /// Service-account token signing key (private).
    pub sa_key: PathBuf,
    /// Service-account token verification key (public).
    pub sa_pub: PathBuf,
    /// Admin client certificate and key (`CN=unwedge-e2e-admin, O=system:masters`).
    pub admin: (PathBuf, PathBuf),
    /// kube-controller-manager client certificate and key.
    pub controller_manager: (PathBuf, PathBuf),
    /// kube-scheduler client certificate and key.
    pub scheduler: (PathBuf, PathBuf),
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl (install the `openssl` package)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Signs a fresh P-256 key's certificate with the CA; `ext` is an openssl extension section.
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    let extfile = format!("{name}.ext");
    std::fs::write(dir.join(&extfile), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            &extfile,
            "-out",
            &crt,
        ],
    )?;
    Ok((dir.join(crt), dir.join(key)))
}

/// Generates the whole PKI into `dir` (about 0.1 s).
pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
    std::fs::create_dir_all(dir)?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-sha256",
            "-subj",
            "/CN=unwedge-e2e-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
    )?;
    let serving = issue(
        dir,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
    )?;
    let client_ext = "basicConstraints=critical,CA:FALSE\n\
                      keyUsage=critical,digitalSignature,keyEncipherment\n\
                      extendedKeyUsage=clientAuth\n";
    let admin = issue(
        dir,
        "admin",
        "/O=system:masters/CN=unwedge-e2e-admin",
        client_ext,
    )?;
    let controller_manager = issue(
        dir,
        "controller-manager",
        "/CN=system:kube-controller-manager",
        client_ext,
    )?;
    let scheduler = issue(dir, "scheduler", "/CN=system:kube-scheduler", client_ext)?;
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(Pki {
        ca_crt: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        serving_crt: serving.0,
        serving_key: serving.1,
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
        admin,
        controller_manager,
        scheduler,
    })
}
