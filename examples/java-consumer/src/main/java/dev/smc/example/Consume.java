package dev.smc.example;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

import org.apache.avro.Schema;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.specific.SpecificRecord;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * Reads every SMC event on a Kafka cluster from the beginning up to the end offsets taken at
 * start, decodes each record into the class avro-maven-plugin generated from schemas/, and
 * prints one JSON object per record.
 *
 * <p>Decoding: each value is Avro single-object encoded (C3 01, the writer schema's CRC-64-AVRO
 * fingerprint, the body). The smc.type header names the event type, which is also the full
 * name of its generated class; that class's BinaryMessageDecoder knows the current schema, and
 * every older version of the type from schemas-history/ is added to it, so a record written
 * with an older version is resolved into the current class (fields added later get their
 * defaults).
 *
 * <p>Usage: Consume BOOTSTRAP HISTORY_DIR [TOPIC_PREFIX]
 */
public final class Consume {
  private static final String[] STREAMS = {"smc.registry", "smc.policy", "smc.certs"};

  private Consume() {}

  public static void main(String[] args) throws Exception {
    if (args.length < 2) {
      System.err.println("usage: Consume BOOTSTRAP HISTORY_DIR [TOPIC_PREFIX]");
      System.exit(2);
    }
    String bootstrap = args[0];
    Path history = Path.of(args[1]);
    String prefix = args.length > 2 ? args[2] : "";
    Map<String, BinaryMessageDecoder<SpecificRecord>> decoders = new HashMap<>();
    addHistory(history, decoders);

    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    int decoded = 0;
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      List<TopicPartition> partitions = new ArrayList<>();
      for (String stream : STREAMS) {
        for (PartitionInfo p : consumer.partitionsFor(prefix + stream, Duration.ofSeconds(30))) {
          partitions.add(new TopicPartition(p.topic(), p.partition()));
        }
      }
      consumer.assign(partitions);
      consumer.seekToBeginning(partitions);
      Map<TopicPartition, Long> end = consumer.endOffsets(partitions, Duration.ofSeconds(30));
      long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
      while (!reached(consumer, end)) {
        if (System.nanoTime() > deadline) {
          throw new IllegalStateException("end offsets " + end + " not reached in 60 s");
        }
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(500))) {
          String type = header(r, "smc.type");
          SpecificRecord event = decoderFor(type, decoders).decode(r.value());
          SpecificRecord envelope = (SpecificRecord) event.get(0); // the first field, always
          Schema.Field eventId = envelope.getSchema().getField("event_id");
          Schema.Field actor = envelope.getSchema().getField("actor");
          System.out.println(
              "{\"topic\": " + json(r.topic().substring(prefix.length()))
                  + ", \"partition\": " + r.partition()
                  + ", \"offset\": " + r.offset()
                  + ", \"key\": " + json(new String(r.key(), StandardCharsets.UTF_8))
                  + ", \"type\": " + json(event.getSchema().getFullName())
                  + ", \"writer_fingerprint\": " + json(fingerprintHex(r.value()))
                  + ", \"event_id\": " + json(String.valueOf(envelope.get(eventId.pos())))
                  + ", \"actor\": " + json(String.valueOf(envelope.get(actor.pos())))
                  + ", \"record\": " + json(event.toString())
                  + "}");
          decoded++;
        }
      }
    }
    System.err.println("decoded " + decoded + " records");
  }

  /** Every older schema version, added to the decoder of its type's generated class. */
  private static void addHistory(Path dir, Map<String, BinaryMessageDecoder<SpecificRecord>> out)
      throws IOException, ReflectiveOperationException {
    try (DirectoryStream<Path> files = Files.newDirectoryStream(dir, "*.avsc")) {
      for (Path file : files) {
        // a fresh parser per file: each history file is self-contained
        Schema old = new Schema.Parser().parse(file.toFile());
        decoderFor(old.getFullName(), out).addSchema(old);
      }
    }
  }

  @SuppressWarnings("unchecked")
  private static BinaryMessageDecoder<SpecificRecord> decoderFor(
      String type, Map<String, BinaryMessageDecoder<SpecificRecord>> cache)
      throws ReflectiveOperationException {
    BinaryMessageDecoder<SpecificRecord> d = cache.get(type);
    if (d == null) {
      Class<?> generated = Class.forName(type); // namespace.Name of the Avro record
      d = (BinaryMessageDecoder<SpecificRecord>) generated.getMethod("getDecoder").invoke(null);
      cache.put(type, d);
    }
    return d;
  }

  private static boolean reached(
      KafkaConsumer<byte[], byte[]> consumer, Map<TopicPartition, Long> end) {
    for (Map.Entry<TopicPartition, Long> e : end.entrySet()) {
      if (consumer.position(e.getKey()) < e.getValue()) {
        return false;
      }
    }
    return true;
  }

  private static String header(ConsumerRecord<byte[], byte[]> r, String name) {
    Header h = r.headers().lastHeader(name);
    if (h == null) {
      throw new IllegalStateException(r.topic() + "[" + r.partition() + "]@" + r.offset()
          + " has no " + name + " header");
    }
    return new String(h.value(), StandardCharsets.UTF_8);
  }

  private static String fingerprintHex(byte[] value) {
    ByteBuffer b = ByteBuffer.wrap(value, 2, 8).order(java.nio.ByteOrder.LITTLE_ENDIAN);
    return String.format("%016x", b.getLong());
  }

  private static String json(String s) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      switch (c) {
        case '"' -> out.append("\\\"");
        case '\\' -> out.append("\\\\");
        case '\n' -> out.append("\\n");
        case '\r' -> out.append("\\r");
        case '\t' -> out.append("\\t");
        default -> {
          if (c < 0x20) {
            out.append(String.format("\\u%04x", (int) c));
          } else {
            out.append(c);
          }
        }
      }
    }
    return out.append('"').toString();
  }
}
