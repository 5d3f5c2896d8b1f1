// Command example walks through the imagesearch.v1 API from Go: health check; index a product with two images
// (the packshot file and a detail view cropped from it, each streamed in 64 KiB chunks after its image_index
// message) and a numeric attribute; search by each image (the hit says which image matched), by text, by a
// region of the packshot and with a ranking rule (with the score's explanation); index an exact re-upload and find
// it with FindDuplicates; read the google.rpc.BadRequest of an INVALID_ARGUMENT; delete both products again.
//
// Build and run it with ../run.sh TARGET IMAGE (it generates the stubs first). Flags:
//
//	example -target localhost:50051 -image mug.jpg [-id go-example-1] [-text "red mug"] [-keep]
//
// IMAGESEARCH_API_KEY, when set, is sent as "authorization: Bearer KEY" (plaintext connections only here).
//
// Exits 1 when an answer is not what the contract says (the product is not the first hit for its own images and
// region, the second image is not the one matched, the rule's part is missing, the re-upload is not found) or
// does not have the documented shape; 2 on bad flags.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"image"
	_ "image/jpeg" // decoders for image.Decode
	"image/png"
	"io"
	"math"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/imagesearch/imagesearch/clients/go/gen/imagesearch/v1"
)

// The chunk size the service recommends: far below gRPC's 4 MiB default message limit.
const chunkBytes = 64 * 1024

// Every call gets a deadline, so a stuck server fails the example instead of hanging it.
const callTimeout = 30 * time.Second

// The detail view: this box of the packshot, in fractions of its width and height. The region search looks for
// the same box.
var detailBox = &pb.NormalizedBox{X0: 0.25, Y0: 0.15, X1: 0.85, Y1: 0.80}

const popularity = 1520.0

func main() {
	target := flag.String("target", "localhost:50051", "server address")
	imagePath := flag.String("image", "", "image file to index and search with: the packshot (required)")
	id := flag.String("id", "go-example-1", "product id to index")
	text := flag.String("text", "red mug", "text query")
	keep := flag.Bool("keep", false, "keep the product instead of deleting it at the end")
	flag.Parse()
	if *imagePath == "" {
		fmt.Fprintln(os.Stderr, "usage: example -target HOST:PORT -image FILE [-id ID] [-text TEXT] [-keep]")
		os.Exit(2)
	}
	if err := run(*target, *imagePath, *id, *text, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		os.Exit(1)
	}
}

func run(target, imagePath, id, text string, keep bool) error {
	packshot, err := os.ReadFile(imagePath)
	if err != nil {
		return err
	}
	detail, err := crop(packshot, detailBox)
	if err != nil {
		return fmt.Errorf("crop %s: %w", imagePath, err)
	}
	dialCtx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	conn, err := grpc.DialContext(dialCtx, target, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return fmt.Errorf("connect to %s: %w", target, err)
	}
	defer conn.Close()
	client := pb.NewImageSearchServiceClient(conn)

	// 1. Health: the empty service name is the whole server; the service name is the search service.
	for _, service := range []string{"", "imagesearch.v1.ImageSearchService"} {
		ctx, cancel := callContext()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		cancel()
		if err != nil {
			return fmt.Errorf("health check %q: %w", service, err)
		}
		fmt.Printf("health %q: %s\n", service, resp.GetStatus())
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("health %q is %s, want SERVING", service, resp.GetStatus())
		}
	}

	// 2. Index: the product message, then each image's bytes in chunks after an image_index message.
	product := &pb.Product{
		Id:         id,
		Name:       "Red mug (Go client)",
		Category:   "mugs",
		Price:      9.5,
		Currency:   "EUR",
		Attributes: map[string]string{"client": "go"},
		Images: []*pb.ProductImage{
			{Id: "packshot", Role: "packshot"},
			{Id: "detail", Role: "detail"},
		},
		NumericAttributes: map[string]float64{"popularity": popularity},
	}
	indexed, err := indexProduct(client, product, packshot, detail)
	if err != nil {
		return fmt.Errorf("IndexProduct: %w", err)
	}
	fmt.Printf("indexed %s (created=%t) with %d images\n", indexed.GetProduct().GetId(), indexed.GetCreated(),
		len(indexed.GetProduct().GetImages()))

	// 3. Search by each image: the product must come back first, and say which of its images matched.
	imageHits, err := search(client, &pb.SearchQuery{TopK: 5}, packshot)
	if err != nil {
		return fmt.Errorf("Search by image: %w", err)
	}
	printHits("image search", imageHits, false)
	detailHits, err := search(client, &pb.SearchQuery{TopK: 5}, detail)
	if err != nil {
		return fmt.Errorf("Search by the second image: %w", err)
	}
	printHits("second-image search", detailHits, false)

	// 4. Search by text.
	textHits, err := search(client, &pb.SearchQuery{Text: text, TopK: 5}, nil)
	if err != nil {
		return fmt.Errorf("Search by text: %w", err)
	}
	printHits(fmt.Sprintf("text search %q", text), textHits, false)

	// 5. Search for a region of the packshot: the server crops the box before encoding it.
	regionHits, err := search(client, &pb.SearchQuery{TopK: 5, Regions: []*pb.NormalizedBox{detailBox}}, packshot)
	if err != nil {
		return fmt.Errorf("Search by region: %w", err)
	}
	printHits("region search", regionHits, false)

	// 6. Business rules: popular products first (0.01 * ln(1 + popularity) added to the score), explained.
	ranking := &pb.RankingSpec{Rules: []*pb.RankingRule{{
		Name:      "popular",
		Signal:    &pb.RankingRule_Field{Field: "popularity"},
		Transform: pb.RankingRule_TRANSFORM_LOG1P,
		Weight:    0.01,
	}}}
	rankedHits, err := search(client, &pb.SearchQuery{TopK: 3, Ranking: ranking, ExplainScores: true}, packshot)
	if err != nil {
		return fmt.Errorf("Search with a ranking rule: %w", err)
	}
	printHits("ranked search (popular first)", rankedHits, true)

	// 7. An exact re-upload under another id: FindDuplicates lists it.
	copyID := id + "-copy"
	if _, err := indexProduct(client, &pb.Product{Id: copyID, Name: "Red mug (a re-upload)", Category: "mugs"}, packshot); err != nil {
		return fmt.Errorf("IndexProduct %s: %w", copyID, err)
	}
	ctx, cancel := callContext()
	duplicates, err := client.FindDuplicates(ctx, &pb.FindDuplicatesRequest{ProductId: id})
	cancel()
	if err != nil {
		return fmt.Errorf("FindDuplicates: %w", err)
	}
	foundCopy := false
	for _, entry := range duplicates.GetProducts() {
		for _, d := range entry.GetDuplicates() {
			fmt.Printf("duplicates of %s: %s similarity=%.4f image %d ~ %d exact=%t\n", entry.GetProductId(),
				d.GetProductId(), d.GetSimilarity(), d.GetImageIndex(), d.GetDuplicateImageIndex(), d.GetExact())
			foundCopy = foundCopy || (d.GetProductId() == copyID && d.GetExact())
		}
	}
	if err := deleteProduct(client, copyID); err != nil {
		return err
	}

	// 8. An invalid request: INVALID_ARGUMENT with a google.rpc.BadRequest naming every offending field.
	if err := showBadRequest(client); err != nil {
		return err
	}

	if !keep {
		if err := deleteProduct(client, id); err != nil {
			return err
		}
		fmt.Printf("deleted %s\n", id)
	}

	for _, check := range []struct {
		what string
		hits *pb.SearchResponse
	}{{"its own image", imageHits}, {"its second image", detailHits}, {"a region of its packshot", regionHits}, {"the ranked search", rankedHits}} {
		if len(check.hits.GetHits()) == 0 || check.hits.GetHits()[0].GetProduct().GetId() != id {
			return fmt.Errorf("%s is not the first hit for %s", id, check.what)
		}
	}
	if got := matched(detailHits.GetHits()[0]); got != "1:detail" {
		return fmt.Errorf("the second image matched image %s, want 1:detail", got)
	}
	var popular float64 = math.NaN()
	for _, rule := range rankedHits.GetHits()[0].GetExplanation().GetRules() {
		if rule.GetName() == "popular" {
			popular = rule.GetValue()
		}
	}
	if math.Abs(popular-math.Log1p(popularity)) > 1e-3 {
		return fmt.Errorf("the ranked hit's popular rule has f=%v, want ln(1 + %v)", popular, popularity)
	}
	if !foundCopy {
		return fmt.Errorf("FindDuplicates did not list %s as an exact duplicate of %s", copyID, id)
	}
	fmt.Printf("OK: %s came back first for its own images and region, with the second image matched\n", id)
	return nil
}

// callContext bounds one call by callTimeout and, when IMAGESEARCH_API_KEY is set, sends it as
// "authorization: Bearer KEY" (servers started with IMAGESEARCH_API_KEYS_FILE require one).
func callContext() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	if key := os.Getenv("IMAGESEARCH_API_KEY"); key != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
	}
	return ctx, cancel
}

// crop returns the box of the image (JPEG or PNG), as a PNG: a second view of the product for this walkthrough.
func crop(data []byte, box *pb.NormalizedBox) ([]byte, error) {
	img, _, err := image.Decode(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	b := img.Bounds()
	at := func(from int, size int, f float32) int { return from + int(math.Round(float64(f)*float64(size))) }
	rect := image.Rect(at(b.Min.X, b.Dx(), box.X0), at(b.Min.Y, b.Dy(), box.Y0), at(b.Min.X, b.Dx(), box.X1), at(b.Min.Y, b.Dy(), box.Y1))
	sub, ok := img.(interface {
		SubImage(image.Rectangle) image.Image
	})
	if !ok {
		return nil, errors.New("this image type cannot be cropped")
	}
	var out bytes.Buffer
	if err := png.Encode(&out, sub.SubImage(rect)); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// indexProduct streams the product, then its images: one image's chunks follow the product directly; with
// several, image i's chunks follow an image_index message set to i.
func indexProduct(client pb.ImageSearchServiceClient, product *pb.Product, images ...[]byte) (*pb.IndexProductResponse, error) {
	ctx, cancel := callContext()
	defer cancel()
	stream, err := client.IndexProduct(ctx)
	if err != nil {
		return nil, err
	}
	err = stream.Send(&pb.IndexProductRequest{Content: &pb.IndexProductRequest_Product{Product: product}})
	for i, data := range images {
		if err != nil {
			break
		}
		if len(images) > 1 {
			err = stream.Send(&pb.IndexProductRequest{Content: &pb.IndexProductRequest_ImageIndex{ImageIndex: int32(i)}})
		}
		if err == nil {
			err = forEachChunk(data, func(chunk []byte) error {
				return stream.Send(&pb.IndexProductRequest{Content: &pb.IndexProductRequest_ImageChunk{ImageChunk: chunk}})
			})
		}
	}
	// io.EOF from Send means the server has already ended the call: CloseAndRecv returns its status.
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return stream.CloseAndRecv()
}

func deleteProduct(client pb.ImageSearchServiceClient, id string) error {
	ctx, cancel := callContext()
	defer cancel()
	if _, err := client.DeleteProduct(ctx, &pb.DeleteProductRequest{Id: id}); err != nil {
		return fmt.Errorf("DeleteProduct %s: %w", id, err)
	}
	return nil
}

// search sends the query, then the image (if any) in chunks.
func search(client pb.ImageSearchServiceClient, query *pb.SearchQuery, image []byte, opts ...grpc.CallOption) (*pb.SearchResponse, error) {
	ctx, cancel := callContext()
	defer cancel()
	stream, err := client.Search(ctx, opts...)
	if err != nil {
		return nil, err
	}
	err = stream.Send(&pb.SearchRequest{Content: &pb.SearchRequest_Query{Query: query}})
	if err == nil && image != nil {
		err = forEachChunk(image, func(chunk []byte) error {
			return stream.Send(&pb.SearchRequest{Content: &pb.SearchRequest_ImageChunk{ImageChunk: chunk}})
		})
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return stream.CloseAndRecv()
}

func forEachChunk(data []byte, send func([]byte) error) error {
	for start := 0; start < len(data); start += chunkBytes {
		end := start + chunkBytes
		if end > len(data) {
			end = len(data)
		}
		if err := send(data[start:end]); err != nil {
			return err
		}
	}
	return nil
}

// matched is the hit's matched image as "index:id", or "-" when the search looked at no image (lexical mode).
func matched(hit *pb.SearchHit) string {
	if hit.MatchedImageIndex == nil {
		return "-"
	}
	return fmt.Sprintf("%d:%s", hit.GetMatchedImageIndex(), hit.GetMatchedImageId())
}

func printHits(title string, resp *pb.SearchResponse, explain bool) {
	fmt.Printf("%s: %d hits (%s, %.1f ms server time)\n", title, len(resp.GetHits()), resp.GetQueryKind(), resp.GetServerTimeMs())
	for i, hit := range resp.GetHits() {
		fmt.Printf("  %d. %-20s score=%.4f image=%s  %s\n", i+1, hit.GetProduct().GetId(), hit.GetScore(), matched(hit), hit.GetProduct().GetName())
		if explain {
			e := hit.GetExplanation()
			var rules []string
			for _, r := range e.GetRules() {
				rules = append(rules, fmt.Sprintf("%s: f=%.4f %+.4f", r.GetName(), r.GetValue(), r.GetWeighted()))
			}
			fmt.Printf("     explanation: relevance=%.4f %s\n", e.GetRelevance(), strings.Join(rules, " "))
		}
	}
}

// showBadRequest sends top_k 1000 (the limit is 100) and price_min > price_max, and prints the field violations.
func showBadRequest(client pb.ImageSearchServiceClient) error {
	priceMin, priceMax := 50.0, 10.0
	query := &pb.SearchQuery{
		Text:   "red mug",
		TopK:   1000,
		Filter: &pb.SearchFilter{PriceMin: &priceMin, PriceMax: &priceMax},
	}
	var header, trailer metadata.MD
	_, err := search(client, query, nil, grpc.Header(&header), grpc.Trailer(&trailer))
	st, _ := status.FromError(err)
	if st.Code() != codes.InvalidArgument {
		return fmt.Errorf("top_k 1000: got %v, want INVALID_ARGUMENT", err)
	}
	fmt.Printf("INVALID_ARGUMENT as expected: %s\n", st.Message())
	// An error before any response is a trailers-only response: the x-request-id header is in the trailers.
	requestID := append(header.Get("x-request-id"), trailer.Get("x-request-id")...)
	fmt.Printf("  x-request-id (to find the server's log line): %s\n", strings.Join(requestID, ","))
	violations := 0
	for _, detail := range st.Details() {
		if badRequest, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range badRequest.GetFieldViolations() {
				fmt.Printf("  field violation: %s: %s\n", v.GetField(), v.GetDescription())
				violations++
			}
		}
	}
	if violations == 0 {
		return errors.New("INVALID_ARGUMENT without google.rpc.BadRequest field violations")
	}
	return nil
}
