//! The wire contract's field names, read from the file descriptor set that `tollgate-proto`
//! compiles in, so that "the error names a field of the request" is judged against the
//! `.proto` files themselves and not against a list kept here.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::FileDescriptorSet;

const PACKAGE: &str = "tollgate.v1";

/// Every message of the contract: its full name (`.tollgate.v1.Usage`) → its fields, each with
/// the full name of its message type when it has one.
struct Contract {
    messages: HashMap<String, Vec<(String, Option<String>)>>,
}

fn contract() -> &'static Contract {
    static CONTRACT: OnceLock<Contract> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        let set = FileDescriptorSet::decode(tollgate_proto::FILE_DESCRIPTOR_SET)
            .expect("tollgate-proto's descriptor set decodes");
        let mut messages = HashMap::new();
        for file in set.file {
            let package = file.package().to_owned();
            let mut pending: Vec<(String, prost_types::DescriptorProto)> = file
                .message_type
                .into_iter()
                .map(|message| (format!(".{package}"), message))
                .collect();
            while let Some((scope, message)) = pending.pop() {
                let name = format!("{scope}.{}", message.name());
                let fields = message
                    .field
                    .iter()
                    .map(|field| {
                        let nested =
                            (field.r#type() == Type::Message).then(|| field.type_name().to_owned());
                        (field.name().to_owned(), nested)
                    })
                    .collect();
                pending.extend(
                    message
                        .nested_type
                        .into_iter()
                        .map(|nested| (name.clone(), nested)),
                );
                messages.insert(name, fields);
            }
        }
        Contract { messages }
    })
}

/// Whether `path` (`amount`, `usage.quantity`, `scope.features`, `metadata[key]`) names a field
/// of `message` (`IssueGrantRequest`), following message-typed fields segment by segment.
pub fn has_field_path(message: &str, path: &str) -> bool {
    let contract = contract();
    let mut current = format!(".{PACKAGE}.{message}");
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        // An index or key after a field (`kinds[2]`) still names that field.
        let name = segment.split('[').next().unwrap_or(segment);
        let Some(fields) = contract.messages.get(&current) else {
            return false;
        };
        let Some((_, nested)) = fields.iter().find(|(field, _)| field == name) else {
            return false;
        };
        if segments.peek().is_some() {
            match nested {
                Some(type_name) => current = type_name.clone(),
                None => return false,
            }
        }
    }
    true
}

/// The contract's rule for a refused request: `INVALID_ARGUMENT`, and a message
/// `"<field path>: <problem>"` whose path names a field of `message`.
pub fn assert_names_field(message: &str, code: tonic::Code, text: &str) {
    assert_eq!(
        code,
        tonic::Code::InvalidArgument,
        "{message} refused with {code:?}: {text:?}"
    );
    assert_refusal_text(message, text);
}

/// The message half of [`assert_names_field`].
pub fn assert_refusal_text(message: &str, text: &str) {
    let (path, problem) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("{message} refusal {text:?} names no field"));
    assert!(
        has_field_path(message, path),
        "{message} refusal {text:?} names {path:?}, which is not a field of {message}"
    );
    assert!(
        problem.len() > 1 && problem.starts_with(' '),
        "{message} refusal {text:?} says no problem after the field"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_message_fields() {
        assert!(has_field_path("IssueGrantRequest", "amount"));
        assert!(has_field_path("IssueGrantRequest", "scope.features"));
        assert!(has_field_path("IssueGrantRequest", "cost_basis.currency"));
        assert!(has_field_path("DebitRequest", "usage.quantity"));
        assert!(has_field_path("ListEntriesRequest", "kinds[3]"));
        assert!(!has_field_path("IssueGrantRequest", "cost"));
        assert!(!has_field_path("IssueGrantRequest", "amount.value"));
        assert!(!has_field_path("NoSuchRequest", "amount"));
    }
}
