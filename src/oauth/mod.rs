//! OAuth2 identities for mailboxes on Microsoft 365 and Gmail (issue 21,
//! under way): so far the sealing of their tokens at rest ([`vault`]).
//! The flows, the refresh and the SASL login come next.

pub mod vault;
