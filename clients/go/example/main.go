// Command example walks through the imagesearch.v1 API from Go: health check, index a product with an image
// streamed from a file in 64 KiB chunks, search by that image and by text, read the google.rpc.BadRequest of an
// INVALID_ARGUMENT, and delete the product again.
//
// Build and run it with ../run.sh TARGET IMAGE (it generates the stubs first). Flags:
//
//	example -target localhost:50051 -image mug.jpg [-id go-example-1] [-text "red mug"] [-keep]
//
// IMAGESEARCH_API_KEY, when set, is sent as "authorization: Bearer KEY" (plaintext connections only here).
//
// Exits 1 when the indexed product is not the first hit for its own image, or when the server's answers do not
// have the documented shape; 2 on bad flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
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

func main() {
	target := flag.String("target", "localhost:50051", "server address")
	imagePath := flag.String("image", "", "image file to index and search with (required)")
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

	// 2. Index: the product message first, then the image bytes in chunks.
	product := &pb.Product{
		Id:         id,
		Name:       "Red mug (Go client)",
		Category:   "mugs",
		Price:      9.5,
		Currency:   "EUR",
		Attributes: map[string]string{"client": "go"},
	}
	indexed, err := indexProduct(client, product, imagePath)
	if err != nil {
		return fmt.Errorf("IndexProduct: %w", err)
	}
	fmt.Printf("indexed %s (created=%t)\n", indexed.GetProduct().GetId(), indexed.GetCreated())

	// 3. Search by the same image: the product must come back first.
	imageHits, err := search(client, &pb.SearchQuery{TopK: 5}, imagePath)
	if err != nil {
		return fmt.Errorf("Search by image: %w", err)
	}
	printHits("image search", imageHits)

	// 4. Search by text.
	textHits, err := search(client, &pb.SearchQuery{Text: text, TopK: 5}, "")
	if err != nil {
		return fmt.Errorf("Search by text: %w", err)
	}
	printHits(fmt.Sprintf("text search %q", text), textHits)

	// 5. An invalid request: INVALID_ARGUMENT with a google.rpc.BadRequest naming every offending field.
	if err := showBadRequest(client); err != nil {
		return err
	}

	if !keep {
		ctx, cancel := callContext()
		_, err := client.DeleteProduct(ctx, &pb.DeleteProductRequest{Id: id})
		cancel()
		if err != nil {
			return fmt.Errorf("DeleteProduct: %w", err)
		}
		fmt.Printf("deleted %s\n", id)
	}

	if len(imageHits.GetHits()) == 0 || imageHits.GetHits()[0].GetProduct().GetId() != id {
		return fmt.Errorf("%s is not the first hit for its own image", id)
	}
	fmt.Printf("OK: %s came back first for its own image\n", id)
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

// indexProduct streams the product, then the file's bytes in chunkBytes pieces (never the whole file at once).
func indexProduct(client pb.ImageSearchServiceClient, product *pb.Product, imagePath string) (*pb.IndexProductResponse, error) {
	ctx, cancel := callContext()
	defer cancel()
	stream, err := client.IndexProduct(ctx)
	if err != nil {
		return nil, err
	}
	err = stream.Send(&pb.IndexProductRequest{Content: &pb.IndexProductRequest_Product{Product: product}})
	if err == nil {
		err = forEachChunk(imagePath, func(chunk []byte) error {
			return stream.Send(&pb.IndexProductRequest{Content: &pb.IndexProductRequest_ImageChunk{ImageChunk: chunk}})
		})
	}
	// io.EOF from Send means the server has already ended the call: CloseAndRecv returns its status.
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return stream.CloseAndRecv()
}

// search sends the query, then the image (if imagePath is set) in chunks.
func search(client pb.ImageSearchServiceClient, query *pb.SearchQuery, imagePath string, opts ...grpc.CallOption) (*pb.SearchResponse, error) {
	ctx, cancel := callContext()
	defer cancel()
	stream, err := client.Search(ctx, opts...)
	if err != nil {
		return nil, err
	}
	err = stream.Send(&pb.SearchRequest{Content: &pb.SearchRequest_Query{Query: query}})
	if err == nil && imagePath != "" {
		err = forEachChunk(imagePath, func(chunk []byte) error {
			return stream.Send(&pb.SearchRequest{Content: &pb.SearchRequest_ImageChunk{ImageChunk: chunk}})
		})
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return stream.CloseAndRecv()
}

func forEachChunk(path string, send func([]byte) error) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for {
		buf := make([]byte, chunkBytes) // a fresh buffer: Send may keep a reference until the message is written
		n, err := io.ReadFull(f, buf)
		if n > 0 {
			if sendErr := send(buf[:n]); sendErr != nil {
				return sendErr
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func printHits(title string, resp *pb.SearchResponse) {
	fmt.Printf("%s: %d hits (%s, %.1f ms server time)\n", title, len(resp.GetHits()), resp.GetQueryKind(), resp.GetServerTimeMs())
	for i, hit := range resp.GetHits() {
		fmt.Printf("  %d. %-20s score=%.4f  %s\n", i+1, hit.GetProduct().GetId(), hit.GetScore(), hit.GetProduct().GetName())
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
	_, err := search(client, query, "", grpc.Header(&header), grpc.Trailer(&trailer))
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
