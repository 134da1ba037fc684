DROP INDEX mesh.presence_closed;
DROP INDEX mesh.message_expires;
DROP INDEX mesh.message_queue_expires;
DROP INDEX mesh.message_queue_delivered;
