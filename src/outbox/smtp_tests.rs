//! SMTP logins against a scripted server on loopback: what the private
//! Postfix cannot be made to do (offer OAUTHBEARER and not XOAUTH2).

use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::SmtpMailer;
use crate::config::{Secret, TokenSource};
use crate::credentials::InHand;

/// A server offering only AUTH OAUTHBEARER, taking `good`; the lines it
/// received.
async fn bearer_only(good: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r).lines();
                let b64 = base64::engine::general_purpose::STANDARD;
                let _ = w.write_all(b"220 fake ESMTP\r\n").await;
                while let Ok(Some(line)) = r.next_line().await {
                    log.lock().unwrap().push(line.clone());
                    let up = line.to_ascii_uppercase();
                    let answer = if up.starts_with("EHLO") {
                        "250-fake\r\n250 AUTH PLAIN OAUTHBEARER\r\n".to_string()
                    } else if let Some(ir) = line.strip_prefix("AUTH OAUTHBEARER ") {
                        let text = String::from_utf8(b64.decode(ir).unwrap()).unwrap();
                        if text.contains(&format!("auth=Bearer {good}\u{1}")) {
                            "235 2.7.0 ok\r\n".to_string()
                        } else {
                            let json = "{\"status\":\"invalid_token\",\"x\":\"\u{202e}\"}";
                            format!("334 {}\r\n", b64.encode(json))
                        }
                    } else if line == "AQ==" {
                        "535 5.7.8 authentication failed\r\n".to_string()
                    } else if up.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        break;
                    } else {
                        "250 ok\r\n".to_string()
                    };
                    let _ = w.write_all(answer.as_bytes()).await;
                }
            });
        }
    });
    (port, seen)
}

fn mailer(port: u16, token: &str) -> SmtpMailer {
    let dir = tempfile::tempdir().unwrap();
    let mut smtp = crate::testing::config(dir.path(), "", "").smtp.clone();
    smtp.endpoint.port = port;
    smtp.endpoint.username = Some("support@example.test".into());
    smtp.endpoint.password = None;
    smtp.endpoint.oauth = Some(TokenSource::Identity("m365".into()));
    SmtpMailer::new(&smtp)
        .unwrap()
        .with_tokens(Arc::new(InHand {
            identity: "m365".into(),
            token: Secret::new(token),
        }))
}

#[tokio::test]
async fn a_server_offering_only_oauthbearer_gets_it_and_its_refusal_is_read() {
    let (port, seen) = bearer_only("good-token").await;
    let ok = mailer(port, "good-token").check().await;
    assert!(ok.is_ok(), "{ok:?}");
    let lines = seen.lock().unwrap().clone();
    let auth = lines
        .iter()
        .find(|l| l.starts_with("AUTH OAUTHBEARER "))
        .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let ir = String::from_utf8(b64.decode(&auth["AUTH OAUTHBEARER ".len()..]).unwrap()).unwrap();
    assert!(
        ir.starts_with("n,a=support@example.test,\u{1}host=127.0.0.1\u{1}"),
        "{ir:?}"
    );

    let (port, _) = bearer_only("good-token").await;
    let e = mailer(port, "old-token")
        .check()
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains(
            "refused the login as \"support@example.test\" with the OAuth 2 token (OAUTHBEARER)"
        ),
        "{e}"
    );
    assert!(e.contains("5.7.8"), "{e}");
    assert!(e.contains("invalid_token"), "the server's JSON: {e}");
    assert!(!e.contains('\u{202e}'), "{e}");
    assert!(!e.contains("old-token"), "no token in errors: {e}");
}
