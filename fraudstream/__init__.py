"""fraudstream: streaming fraud detection on Apache Kafka with Avro and a Schema Registry."""

__version__ = "0.1.0"
