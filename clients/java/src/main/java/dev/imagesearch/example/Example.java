package dev.imagesearch.example;

import com.google.protobuf.Any;
import com.google.protobuf.ByteString;
import com.google.rpc.BadRequest;
import dev.imagesearch.v1.DeleteProductRequest;
import dev.imagesearch.v1.Duplicate;
import dev.imagesearch.v1.FindDuplicatesRequest;
import dev.imagesearch.v1.FindDuplicatesResponse;
import dev.imagesearch.v1.ImageSearchServiceGrpc;
import dev.imagesearch.v1.IndexProductRequest;
import dev.imagesearch.v1.IndexProductResponse;
import dev.imagesearch.v1.NormalizedBox;
import dev.imagesearch.v1.Product;
import dev.imagesearch.v1.ProductDuplicates;
import dev.imagesearch.v1.ProductImage;
import dev.imagesearch.v1.RankingRule;
import dev.imagesearch.v1.RankingSpec;
import dev.imagesearch.v1.ScoreExplanation;
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
import java.awt.image.BufferedImage;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.stream.Collectors;
import javax.imageio.ImageIO;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.Function;

/**
 * Walks through the imagesearch.v1 API from Java: health check; index a product with two images (the packshot
 * file and a detail view cropped from it, each streamed in 64 KiB chunks after its image_index message) and a
 * numeric attribute; search by each image (the hit says which image matched), by text, by a region of the
 * packshot and with a ranking rule (with the score's explanation); index an exact re-upload and find it with
 * FindDuplicates; read the google.rpc.BadRequest of an INVALID_ARGUMENT; delete both products again.
 *
 * <p>Build and run it with {@code clients/java/run.sh TARGET IMAGE [--id ID] [--text TEXT] [--keep]}; set
 * IMAGESEARCH_API_KEY to send an API key (plaintext connections only here). Exits 1 when an answer is not what
 * the contract says (the product is not the first hit for its own images and region, the second image is not the
 * one matched, the rule's part is missing, the re-upload is not found) or does not have the documented shape, 2
 * on bad arguments.
 */
public final class Example {
  /** The chunk size the service recommends: far below gRPC's 4 MiB default message limit. */
  private static final int CHUNK_BYTES = 64 * 1024;

  /** Every call gets a deadline, so a stuck server fails the example instead of hanging it. */
  private static final long CALL_TIMEOUT_S = 30;

  /** The detail view: this box of the packshot (fractions of its size); the region search looks for it too. */
  private static final NormalizedBox DETAIL_BOX =
      NormalizedBox.newBuilder().setX0(0.25f).setY0(0.15f).setX1(0.85f).setY1(0.80f).build();

  private static final double POPULARITY = 1520;

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

  private int run(Path imagePath, String id, String text, boolean keep) throws IOException {
    byte[] packshot = Files.readAllBytes(imagePath);
    byte[] detail = crop(packshot, DETAIL_BOX);

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

    // 2. Index: the product message, then each image's bytes in chunks after an image_index message.
    Product product =
        Product.newBuilder()
            .setId(id)
            .setName("Red mug (Java client)")
            .setCategory("mugs")
            .setPrice(9.5)
            .setCurrency("EUR")
            .putAttributes("client", "java")
            .addImages(ProductImage.newBuilder().setId("packshot").setRole("packshot"))
            .addImages(ProductImage.newBuilder().setId("detail").setRole("detail"))
            .putNumericAttributes("popularity", POPULARITY)
            .build();
    IndexProductResponse indexed = indexProduct(product, packshot, detail);
    System.out.printf(
        "indexed %s (created=%s) with %d images%n",
        indexed.getProduct().getId(), indexed.getCreated(), indexed.getProduct().getImagesCount());

    // 3. Search by each image: the product must come back first, and say which of its images matched.
    SearchResponse imageHits = search(SearchQuery.newBuilder().setTopK(5).build(), packshot, async);
    printHits("image search", imageHits, false);
    SearchResponse detailHits = search(SearchQuery.newBuilder().setTopK(5).build(), detail, async);
    printHits("second-image search", detailHits, false);

    // 4. Search by text.
    SearchResponse textHits = search(SearchQuery.newBuilder().setText(text).setTopK(5).build(), null, async);
    printHits("text search \"" + text + "\"", textHits, false);

    // 5. Search for a region of the packshot: the server crops the box before encoding it.
    SearchResponse regionHits =
        search(SearchQuery.newBuilder().setTopK(5).addRegions(DETAIL_BOX).build(), packshot, async);
    printHits("region search", regionHits, false);

    // 6. Business rules: popular products first (0.01 * ln(1 + popularity) added to the score), explained.
    RankingSpec ranking =
        RankingSpec.newBuilder()
            .addRules(
                RankingRule.newBuilder()
                    .setName("popular")
                    .setField("popularity")
                    .setTransform(RankingRule.Transform.TRANSFORM_LOG1P)
                    .setWeight(0.01f))
            .build();
    SearchResponse rankedHits =
        search(
            SearchQuery.newBuilder().setTopK(3).setRanking(ranking).setExplainScores(true).build(), packshot, async);
    printHits("ranked search (popular first)", rankedHits, true);

    // 7. An exact re-upload under another id: FindDuplicates lists it.
    String copyId = id + "-copy";
    indexProduct(
        Product.newBuilder().setId(copyId).setName("Red mug (a re-upload)").setCategory("mugs").build(), packshot);
    FindDuplicatesResponse duplicates =
        blocking().findDuplicates(FindDuplicatesRequest.newBuilder().setProductId(id).build());
    boolean foundCopy = false;
    for (ProductDuplicates entry : duplicates.getProductsList()) {
      for (Duplicate d : entry.getDuplicatesList()) {
        System.out.printf(
            "duplicates of %s: %s similarity=%.4f image %d ~ %d exact=%s%n",
            entry.getProductId(), d.getProductId(), d.getSimilarity(), d.getImageIndex(), d.getDuplicateImageIndex(),
            d.getExact());
        foundCopy |= d.getProductId().equals(copyId) && d.getExact();
      }
    }
    blocking().deleteProduct(DeleteProductRequest.newBuilder().setId(copyId).build());

    // 8. An invalid request: INVALID_ARGUMENT with a google.rpc.BadRequest naming every offending field.
    if (!showBadRequest()) {
      return 1;
    }

    if (!keep) {
      blocking().deleteProduct(DeleteProductRequest.newBuilder().setId(id).build());
      System.out.printf("deleted %s%n", id);
    }

    boolean ok = firstIs(imageHits, id, "its own image");
    ok &= firstIs(detailHits, id, "its second image");
    ok &= firstIs(regionHits, id, "a region of its packshot");
    ok &= firstIs(rankedHits, id, "the ranked search");
    if (detailHits.getHitsCount() > 0 && !matched(detailHits.getHits(0)).equals("1:detail")) {
      System.err.printf("FAIL: the second image matched image %s, want 1:detail%n", matched(detailHits.getHits(0)));
      ok = false;
    }
    if (rankedHits.getHitsCount() > 0) {
      double popular = Double.NaN;
      for (ScoreExplanation.RuleContribution rule : rankedHits.getHits(0).getExplanation().getRulesList()) {
        if (rule.getName().equals("popular")) {
          popular = rule.getValue();
        }
      }
      if (!(Math.abs(popular - Math.log1p(POPULARITY)) <= 1e-3)) {
        System.err.printf("FAIL: the ranked hit's popular rule has f=%s, want ln(1 + %s)%n", popular, POPULARITY);
        ok = false;
      }
    }
    if (!foundCopy) {
      System.err.printf("FAIL: FindDuplicates did not list %s as an exact duplicate of %s%n", copyId, id);
      ok = false;
    }
    if (!ok) {
      return 1;
    }
    System.out.printf("OK: %s came back first for its own images and region, with the second image matched%n", id);
    return 0;
  }

  private ImageSearchServiceGrpc.ImageSearchServiceBlockingStub blocking() {
    return ImageSearchServiceGrpc.newBlockingStub(channel).withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS);
  }

  private static boolean firstIs(SearchResponse response, String id, String what) {
    if (response.getHitsCount() > 0 && response.getHits(0).getProduct().getId().equals(id)) {
      return true;
    }
    System.err.printf("FAIL: %s is not the first hit for %s%n", id, what);
    return false;
  }

  /** The box of the image (JPEG or PNG), as a PNG: a second view of the product for this walkthrough. */
  private static byte[] crop(byte[] data, NormalizedBox box) throws IOException {
    BufferedImage image = ImageIO.read(new ByteArrayInputStream(data));
    if (image == null) {
      throw new IOException("not an image ImageIO can read");
    }
    int w = image.getWidth();
    int h = image.getHeight();
    int x0 = Math.round(box.getX0() * w);
    int y0 = Math.round(box.getY0() * h);
    BufferedImage part = image.getSubimage(x0, y0, Math.round(box.getX1() * w) - x0, Math.round(box.getY1() * h) - y0);
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    ImageIO.write(part, "png", out);
    return out.toByteArray();
  }

  /**
   * Streams the product, then its images: one image's chunks follow the product directly; with several, image i's
   * chunks follow an image_index message set to i.
   */
  private IndexProductResponse indexProduct(Product product, byte[]... images) {
    List<IndexProductRequest> messages = new ArrayList<>();
    messages.add(IndexProductRequest.newBuilder().setProduct(product).build());
    for (int i = 0; i < images.length; i++) {
      if (images.length > 1) {
        messages.add(IndexProductRequest.newBuilder().setImageIndex(i).build());
      }
      for (ByteString chunk : chunks(images[i])) {
        messages.add(IndexProductRequest.newBuilder().setImageChunk(chunk).build());
      }
    }
    return clientStream(async.withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS)::indexProduct, messages);
  }

  private SearchResponse search(
      SearchQuery query, byte[] image, ImageSearchServiceGrpc.ImageSearchServiceStub stub) {
    List<SearchRequest> messages = new ArrayList<>();
    messages.add(SearchRequest.newBuilder().setQuery(query).build());
    if (image != null) {
      for (ByteString chunk : chunks(image)) {
        messages.add(SearchRequest.newBuilder().setImageChunk(chunk).build());
      }
    }
    return clientStream(stub.withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS)::search, messages);
  }

  /** The bytes in CHUNK_BYTES pieces (the last one shorter). */
  private static List<ByteString> chunks(byte[] data) {
    List<ByteString> chunks = new ArrayList<>();
    for (int start = 0; start < data.length; start += CHUNK_BYTES) {
      chunks.add(ByteString.copyFrom(data, start, Math.min(CHUNK_BYTES, data.length - start)));
    }
    return chunks;
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
   * Calls a client-streaming RPC with these messages (the head message, then image chunks). Blocks until the
   * response (or the error, thrown as StatusRuntimeException) arrives. gRPC buffers what the server has not read
   * yet, which is fine for images of a few MiB; a client that streams much more should wait for
   * ClientCallStreamObserver.isReady() (setOnReadyHandler) between chunks.
   */
  private static <Req, Resp> Resp clientStream(
      Function<StreamObserver<Resp>, StreamObserver<Req>> call, List<Req> messages) {
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
      for (Req message : messages) {
        requests.onNext(message);
      }
      requests.onCompleted();
    } catch (RuntimeException e) {
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

  /** The hit's matched image as "index:id", or "-" when the search looked at no image (lexical mode). */
  private static String matched(SearchHit hit) {
    return hit.hasMatchedImageIndex() ? hit.getMatchedImageIndex() + ":" + hit.getMatchedImageId() : "-";
  }

  private static void printHits(String title, SearchResponse response, boolean explain) {
    System.out.printf(
        "%s: %d hits (%s, %.1f ms server time)%n",
        title, response.getHitsCount(), response.getQueryKind(), response.getServerTimeMs());
    int rank = 1;
    for (SearchHit hit : response.getHitsList()) {
      System.out.printf(
          "  %d. %-20s score=%.4f image=%s  %s%n",
          rank++, hit.getProduct().getId(), hit.getScore(), matched(hit), hit.getProduct().getName());
      if (explain) {
        ScoreExplanation e = hit.getExplanation();
        String rules =
            e.getRulesList().stream()
                .map(r -> String.format("%s: f=%.4f %+.4f", r.getName(), r.getValue(), r.getWeighted()))
                .collect(Collectors.joining(" "));
        System.out.printf("     explanation: relevance=%.4f %s%n", e.getRelevance(), rules);
      }
    }
  }
}
