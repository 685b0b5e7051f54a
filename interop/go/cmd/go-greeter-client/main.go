// go-greeter-client calls greeter.v1 through grpc-go, finding the servers with etcd's own
// gRPC resolver (go.etcd.io/etcd/client/v3/naming/resolver) and balancing them round robin.
//
// It prints one line of JSON at the end: the calls made, the failures, and who served them:
// {"calls":N,"failed":F,"served_by":{"a":n,…},"errors":{"Unavailable: …":n}}. It exits 1 if
// any call failed.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	greeterv1 "github.com/mesh-rs/mesh/interop/go/greeter/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

type report struct {
	Calls    int            `json:"calls"`
	Failed   int            `json:"failed"`
	ServedBy map[string]int `json:"served_by"`
	Errors   map[string]int `json:"errors"`
}

func main() {
	etcd := flag.String("etcd", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	target := flag.String("target", "etcd:///mesh/services/greeter", "the gRPC target")
	name := flag.String("name", "go", "the name to greet")
	count := flag.Int("count", 10, "calls to make (when no -duration)")
	duration := flag.Duration("duration", 0, "keep calling this long instead")
	interval := flag.Duration("interval", 0, "pause between calls")
	timeout := flag.Duration("timeout", time.Second, "deadline of each call")
	caFile := flag.String("tls-ca", "", "call over TLS, trusting this CA (PEM)")
	serverName := flag.String("tls-server-name", "", "the name the servers' certificates carry")
	authority := flag.String("authority", "", "the :authority of every call (default: grpc-go's, the target's endpoint)")
	flag.Parse()
	log.SetPrefix("go-greeter-client: ")

	cli, err := clientv3.New(clientv3.Config{Endpoints: strings.Split(*etcd, ","), DialTimeout: 5 * time.Second})
	if err != nil {
		log.Fatalf("etcd: %v", err)
	}
	defer cli.Close()
	builder, err := resolver.NewBuilder(cli)
	if err != nil {
		log.Fatalf("resolver: %v", err)
	}
	creds := insecure.NewCredentials()
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			log.Fatalf("TLS: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			log.Fatalf("TLS: no certificate in %s", *caFile)
		}
		creds = credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: *serverName})
	}
	options := []grpc.DialOption{
		grpc.WithResolvers(builder),
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
	}
	if *authority != "" {
		options = append(options, grpc.WithAuthority(*authority))
	}
	conn, err := grpc.NewClient(*target, options...)
	if err != nil {
		log.Fatalf("dial %s: %v", *target, err)
	}
	defer conn.Close()
	client := greeterv1.NewGreeterClient(conn)

	r := report{ServedBy: map[string]int{}, Errors: map[string]int{}}
	until := time.Now().Add(*duration)
	for i := 0; ; i++ {
		if *duration > 0 && !time.Now().Before(until) || *duration == 0 && i >= *count {
			break
		}
		if i > 0 && *interval > 0 {
			time.Sleep(*interval)
		}
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		// Wait for a ready server within the deadline, as mesh's client does, rather than
		// failing a call made before the resolver's first answer.
		reply, err := client.SayHello(ctx, &greeterv1.HelloRequest{Name: *name}, grpc.WaitForReady(true))
		cancel()
		r.Calls++
		if err != nil {
			r.Failed++
			s := status.Convert(err)
			r.Errors[fmt.Sprintf("%s: %s", s.Code(), s.Message())]++
			continue
		}
		r.ServedBy[reply.GetServedBy()]++
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
	if r.Failed > 0 {
		os.Exit(1)
	}
}
