//! One integration-test binary: every test runs the real escalator binary
//! against a private Dovecot + Postfix and reads the results back over
//! IMAP and the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bounces;
mod cluster;
mod crash;
mod escalation;
mod exim;
mod gateway;
mod hardening;
mod languages;
mod mailservers;
mod oauth;
mod operations;
mod postgres;
mod queues;
mod reliability;
mod support;
mod templates;

#[path = "../../src/testing/authserver.rs"]
mod authserver;

#[path = "../../src/testing/postgres.rs"]
mod postgres_server;
