// @generated automatically by Diesel CLI.

pub mod mesh {
    diesel::table! {
        mesh.hello_seen (signature) {
            signature -> Text,
            seen_at -> Timestamptz,
        }
    }

    diesel::table! {
        mesh.member (id) {
            id -> Uuid,
            mesh_id -> Uuid,
            name -> Text,
            pubkey -> Text,
            admin -> Bool,
            created_at -> Timestamptz,
            revoked_at -> Nullable<Timestamptz>,
        }
    }

    diesel::table! {
        mesh.mesh (id) {
            id -> Uuid,
            name -> Text,
            created_at -> Timestamptz,
        }
    }

    diesel::table! {
        mesh.message (id) {
            id -> Uuid,
            mesh_id -> Uuid,
            sender_member_id -> Uuid,
            sender_session_pubkey -> Nullable<Text>,
            sender_name -> Text,
            target_spec -> Text,
            priority -> Text,
            nonce -> Text,
            ciphertext -> Text,
            reply_to_id -> Nullable<Text>,
            mentions -> Nullable<Jsonb>,
            client_message_id -> Nullable<Text>,
            request_fingerprint -> Nullable<Text>,
            dedupe_key -> Nullable<Text>,
            created_at -> Timestamptz,
            expires_at -> Timestamptz,
        }
    }

    diesel::table! {
        mesh.message_queue (id) {
            id -> Int8,
            message_id -> Uuid,
            mesh_id -> Uuid,
            recipient_member_id -> Uuid,
            recipient_key -> Nullable<Text>,
            priority -> Text,
            created_at -> Timestamptz,
            expires_at -> Timestamptz,
            not_before -> Timestamptz,
            claimed_at -> Nullable<Timestamptz>,
            claim_id -> Nullable<Uuid>,
            claim_expires_at -> Nullable<Timestamptz>,
            claim_presence_id -> Nullable<Uuid>,
            claim_node_id -> Nullable<Uuid>,
            attempts -> Int4,
            delivered_at -> Nullable<Timestamptz>,
            dead_at -> Nullable<Timestamptz>,
            dead_reason -> Nullable<Text>,
        }
    }

    diesel::table! {
        mesh.presence (id) {
            id -> Uuid,
            mesh_id -> Uuid,
            member_id -> Uuid,
            session_id -> Text,
            session_pubkey -> Nullable<Text>,
            role -> Text,
            display_name -> Text,
            status -> Text,
            summary -> Nullable<Text>,
            groups -> Jsonb,
            visible -> Bool,
            pid -> Nullable<Int8>,
            cwd -> Nullable<Text>,
            hostname -> Nullable<Text>,
            peer_type -> Nullable<Text>,
            channel -> Nullable<Text>,
            model -> Nullable<Text>,
            broker_node_id -> Uuid,
            connected_at -> Timestamptz,
            last_seen_at -> Timestamptz,
            disconnected_at -> Nullable<Timestamptz>,
            grace_until -> Nullable<Timestamptz>,
        }
    }

    diesel::joinable!(member -> mesh (mesh_id));
    diesel::joinable!(message -> member (sender_member_id));
    diesel::joinable!(message -> mesh (mesh_id));
    diesel::joinable!(message_queue -> member (recipient_member_id));
    diesel::joinable!(message_queue -> message (message_id));
    diesel::joinable!(presence -> member (member_id));
    diesel::joinable!(presence -> mesh (mesh_id));

    diesel::allow_tables_to_appear_in_same_query!(
        hello_seen,
        member,
        mesh,
        message,
        message_queue,
        presence,
    );
}
