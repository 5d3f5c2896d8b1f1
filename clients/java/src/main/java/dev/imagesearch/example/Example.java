package dev.imagesearch.example;

import com.google.protobuf.Any;
import com.google.protobuf.ByteString;
import com.google.rpc.BadRequest;
import dev.imagesearch.v1.DeleteProductRequest;
import dev.imagesearch.v1.ImageSearchServiceGrpc;
import dev.imagesearch.v1.IndexProductRequest;
import dev.imagesearch.v1.IndexProductResponse;
import dev.imagesearch.v1.Product;
import dev.imagesearch.v1.SearchFilter;
import dev.imagesearch.v1.SearchHit;
import dev.imagesearch.v1.SearchQuery;
import dev.imagesearch.v1.SearchRequest;
import dev.imagesearch.v1.SearchResponse;
import io.grpc.Channel;
import io.grpc.ClientInterceptors;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.Function;

/**
 * Walks through the imagesearch.v1 API from Java: health check, index a product with an image streamed from a
 * file in 64 KiB chunks, search by that image and by text, read the google.rpc.BadRequest of an INVALID_ARGUMENT,
 * and delete the product again.
 *
 * <p>Build and run it with {@code clients/java/run.sh TARGET IMAGE [--id ID] [--text TEXT] [--keep]}; set
 * IMAGESEARCH_API_KEY to send an API key (plaintext connections only here). Exits 1
 * when the indexed product is not the first hit for its own image or an answer does not have the documented
 * shape, 2 on bad arguments.
 */
public final class Example {
  /** The chunk size the service recommends: far below gRPC's 4 MiB default message limit. */
  private static final int CHUNK_BYTES = 64 * 1024;

  /** Every call gets a deadline, so a stuck server fails the example instead of hanging it. */
  private static final long CALL_TIMEOUT_S = 30;

  private static final Metadata.Key<String> REQUEST_ID =
      Metadata.Key.of("x-request-id", Metadata.ASCII_STRING_MARSHALLER);

  private final ImageSearchServiceGrpc.ImageSearchServiceStub async;
  private final Channel channel;

  private Example(Channel channel) {
    this.channel = channel;
    this.async = ImageSearchServiceGrpc.newStub(channel);
  }

  /**
   * The channel for every call: with IMAGESEARCH_API_KEY set, each call sends "authorization: Bearer KEY"
   * (servers started with IMAGESEARCH_API_KEYS_FILE require one).
   */
  private static Channel withApiKey(ManagedChannel channel) {
    String key = System.getenv("IMAGESEARCH_API_KEY");
    if (key == null || key.isEmpty()) {
      return channel;
    }
    Metadata headers = new Metadata();
    headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + key);
    return ClientInterceptors.intercept(channel, MetadataUtils.newAttachHeadersInterceptor(headers));
  }

  public static void main(String[] args) throws Exception {
    if (args.length < 2) {
      System.err.println("usage: Example TARGET IMAGE [--id ID] [--text TEXT] [--keep]");
      System.exit(2);
    }
    String target = args[0];
    Path image = Path.of(args[1]);
    String id = "java-example-1";
    String text = "red mug";
    boolean keep = false;
    for (int i = 2; i < args.length; i++) {
      switch (args[i]) {
        case "--id" -> id = args[++i];
        case "--text" -> text = args[++i];
        case "--keep" -> keep = true;
        default -> {
          System.err.println("unknown argument: " + args[i]);
          System.exit(2);
        }
      }
    }
    ManagedChannel channel = ManagedChannelBuilder.forTarget(target).usePlaintext().build();
    int code;
    try {
      code = new Example(withApiKey(channel)).run(image, id, text, keep);
    } catch (StatusRuntimeException | IOException e) {
      System.err.println("FAIL: " + e);
      code = 1;
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(code);
  }

  private int run(Path image, String id, String text, boolean keep) throws IOException {
    // 1. Health: the empty service name is the whole server; the service name is the search service.
    for (String service : List.of("", "imagesearch.v1.ImageSearchService")) {
      HealthCheckResponse health =
          HealthGrpc.newBlockingStub(channel)
              .withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS)
              .check(HealthCheckRequest.newBuilder().setService(service).build());
      System.out.printf("health \"%s\": %s%n", service, health.getStatus());
      if (health.getStatus() != HealthCheckResponse.ServingStatus.SERVING) {
        System.err.println("FAIL: health \"" + service + "\" is not SERVING");
        return 1;
      }
    }

    // 2. Index: the product message first, then the image bytes in chunks.
    Product product =
        Product.newBuilder()
            .setId(id)
            .setName("Red mug (Java client)")
            .setCategory("mugs")
            .setPrice(9.5)
            .setCurrency("EUR")
            .putAttributes("client", "java")
            .build();
    IndexProductResponse indexed =
        clientStream(
            async.withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS)::indexProduct,
            IndexProductRequest.newBuilder().setProduct(product).build(),
            image,
            chunk -> IndexProductRequest.newBuilder().setImageChunk(chunk).build());
    System.out.printf("indexed %s (created=%s)%n", indexed.getProduct().getId(), indexed.getCreated());

    // 3. Search by the same image: the product must come back first.
    SearchResponse imageHits = search(SearchQuery.newBuilder().setTopK(5).build(), image, async);
    printHits("image search", imageHits);

    // 4. Search by text.
    SearchResponse textHits = search(SearchQuery.newBuilder().setText(text).setTopK(5).build(), null, async);
    printHits("text search \"" + text + "\"", textHits);

    // 5. An invalid request: INVALID_ARGUMENT with a google.rpc.BadRequest naming every offending field.
    if (!showBadRequest()) {
      return 1;
    }

    if (!keep) {
      ImageSearchServiceGrpc.newBlockingStub(channel)
          .withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS)
          .deleteProduct(DeleteProductRequest.newBuilder().setId(id).build());
      System.out.printf("deleted %s%n", id);
    }

    if (imageHits.getHitsCount() == 0 || !imageHits.getHits(0).getProduct().getId().equals(id)) {
      System.err.printf("FAIL: %s is not the first hit for its own image%n", id);
      return 1;
    }
    System.out.printf("OK: %s came back first for its own image%n", id);
    return 0;
  }

  private SearchResponse search(
      SearchQuery query, Path image, ImageSearchServiceGrpc.ImageSearchServiceStub stub) throws IOException {
    return clientStream(
        stub.withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS)::search,
        SearchRequest.newBuilder().setQuery(query).build(),
        image,
        chunk -> SearchRequest.newBuilder().setImageChunk(chunk).build());
  }

  /** Sends top_k 1000 (the limit is 100) and price_min > price_max, and prints the field violations. */
  private boolean showBadRequest() throws IOException {
    AtomicReference<Metadata> headers = new AtomicReference<>();
    AtomicReference<Metadata> trailers = new AtomicReference<>();
    SearchQuery query =
        SearchQuery.newBuilder()
            .setText("red mug")
            .setTopK(1000)
            .setFilter(SearchFilter.newBuilder().setPriceMin(50).setPriceMax(10))
            .build();
    try {
      search(query, null, async.withInterceptors(MetadataUtils.newCaptureMetadataInterceptor(headers, trailers)));
      System.err.println("FAIL: top_k 1000 was accepted");
      return false;
    } catch (StatusRuntimeException e) {
      if (e.getStatus().getCode() != Status.Code.INVALID_ARGUMENT) {
        System.err.println("FAIL: top_k 1000: got " + e.getStatus() + ", want INVALID_ARGUMENT");
        return false;
      }
      // An error before any response is a trailers-only response: the x-request-id header is in the trailers.
      Metadata meta = headers.get() != null && headers.get().containsKey(REQUEST_ID) ? headers.get() : trailers.get();
      System.out.println("INVALID_ARGUMENT as expected: " + e.getStatus().getDescription());
      System.out.println("  x-request-id (to find the server's log line): " + (meta == null ? null : meta.get(REQUEST_ID)));
      com.google.rpc.Status status = StatusProto.fromThrowable(e);
      int violations = 0;
      for (Any detail : status == null ? List.<Any>of() : status.getDetailsList()) {
        if (detail.is(BadRequest.class)) {
          for (BadRequest.FieldViolation v : detail.unpack(BadRequest.class).getFieldViolationsList()) {
            System.out.printf("  field violation: %s: %s%n", v.getField(), v.getDescription());
            violations++;
          }
        }
      }
      if (violations == 0) {
        System.err.println("FAIL: INVALID_ARGUMENT without google.rpc.BadRequest field violations");
        return false;
      }
      return true;
    }
  }

  /**
   * Calls a client-streaming RPC: the head message, then the image file (if any) read and sent in CHUNK_BYTES
   * pieces, never whole. Blocks until the response (or the error, thrown as StatusRuntimeException) arrives.
   * gRPC buffers what the server has not read yet, which is fine for images of a few MiB; a client that streams
   * much more should wait for ClientCallStreamObserver.isReady() (setOnReadyHandler) between chunks.
   */
  private static <Req, Resp> Resp clientStream(
      Function<StreamObserver<Resp>, StreamObserver<Req>> call,
      Req head,
      Path image,
      Function<ByteString, Req> chunkMessage)
      throws IOException {
    CompletableFuture<Resp> result = new CompletableFuture<>();
    StreamObserver<Req> requests =
        call.apply(
            new StreamObserver<Resp>() {
              private Resp response;

              @Override
              public void onNext(Resp value) {
                response = value;
              }

              @Override
              public void onError(Throwable t) {
                result.completeExceptionally(t);
              }

              @Override
              public void onCompleted() {
                result.complete(response);
              }
            });
    try {
      requests.onNext(head);
      if (image != null) {
        try (InputStream in = Files.newInputStream(image)) {
          byte[] buffer = new byte[CHUNK_BYTES];
          int n;
          while ((n = in.readNBytes(buffer, 0, buffer.length)) > 0) {
            requests.onNext(chunkMessage.apply(ByteString.copyFrom(buffer, 0, n)));
          }
        }
      }
      requests.onCompleted();
    } catch (IOException | RuntimeException e) {
      requests.onError(e); // cancels the call
      throw e;
    }
    try {
      return result.get();
    } catch (ExecutionException e) {
      if (e.getCause() instanceof StatusRuntimeException s) {
        throw s;
      }
      throw new IllegalStateException(e.getCause());
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new IllegalStateException(e);
    }
  }

  private static void printHits(String title, SearchResponse response) {
    System.out.printf(
        "%s: %d hits (%s, %.1f ms server time)%n",
        title, response.getHitsCount(), response.getQueryKind(), response.getServerTimeMs());
    int rank = 1;
    for (SearchHit hit : response.getHitsList()) {
      System.out.printf(
          "  %d. %-20s score=%.4f  %s%n", rank++, hit.getProduct().getId(), hit.getScore(), hit.getProduct().getName());
    }
  }
}
