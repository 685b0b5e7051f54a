// go-greeter-server serves greeter.v1 with grpc-go and registers itself in etcd with etcd's
// own naming package (endpoints.Manager), as a Go service beside mesh's would.
//
// It prints one line, "serving ADDR as INSTANCE at KEY", once it serves and is registered.
// On SIGTERM or SIGINT it deletes its key, serves for -grace more, stops gracefully and
// exits 0.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	greeterv1 "github.com/mesh-rs/mesh/interop/go/greeter/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

type greeter struct {
	greeterv1.UnimplementedGreeterServer
	instance string
}

func (g *greeter) SayHello(_ context.Context, r *greeterv1.HelloRequest) (*greeterv1.HelloReply, error) {
	if r.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "name must not be empty")
	}
	return &greeterv1.HelloReply{Message: "Hello, " + r.GetName() + "!", ServedBy: g.instance}, nil
}

func (g *greeter) SayHelloStream(r *greeterv1.HelloStreamRequest, s grpc.ServerStreamingServer[greeterv1.HelloReply]) error {
	if r.GetName() == "" {
		return status.Error(codes.InvalidArgument, "name must not be empty")
	}
	n := r.GetCount()
	if n == 0 {
		n = 1
	}
	for i := uint32(0); i < n; i++ {
		if err := s.Send(&greeterv1.HelloReply{Message: "Hello, " + r.GetName() + "!", ServedBy: g.instance}); err != nil {
			return err
		}
	}
	return nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	advertise := flag.String("advertise", "", "address to register (default: the bound address)")
	etcd := flag.String("etcd", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	prefix := flag.String("prefix", "/mesh", "root prefix of mesh's keys")
	service := flag.String("service", "greeter", "service to register under")
	instance := flag.String("instance", "", "instance id, the key's last part and served_by (default: the address)")
	weight := flag.Int("weight", 0, "weight in the registration's Metadata (0: none)")
	ttl := flag.Int64("ttl", 10, "lease TTL in seconds")
	grace := flag.Duration("grace", 500*time.Millisecond, "how long to serve after deregistering")
	certFile := flag.String("tls-cert", "", "serve TLS with this certificate (PEM)")
	keyFile := flag.String("tls-key", "", "the key of -tls-cert (PEM)")
	noRegister := flag.Bool("no-register", false, "serve only")
	flag.Parse()
	log.SetPrefix("go-greeter-server: ")

	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen %s: %v", *listen, err)
	}
	addr := *advertise
	if addr == "" {
		addr = lis.Addr().String()
	}
	id := *instance
	if id == "" {
		id = addr
	}
	var opts []grpc.ServerOption
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("TLS: %v", err)
		}
		opts = append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	}
	srv := grpc.NewServer(opts...)
	greeterv1.RegisterGreeterServer(srv, &greeter{instance: id})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()

	key := fmt.Sprintf("%s/services/%s/%s", *prefix, *service, id)
	var deregister func()
	if !*noRegister {
		deregister = register(strings.Split(*etcd, ","), *prefix+"/services/"+*service, key, addr, id, *weight, *ttl, *certFile != "")
	}
	fmt.Printf("serving %s as %s at %s\n", addr, id, key)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
	case err := <-served:
		log.Fatalf("serve: %v", err)
	}
	if deregister != nil {
		deregister()
	}
	time.Sleep(*grace)
	srv.GracefulStop()
}

// register adds the endpoint under a lease kept alive, and returns what removes it.
func register(etcd []string, target, key, addr, id string, weight int, ttl int64, tlsOn bool) func() {
	cli, err := clientv3.New(clientv3.Config{Endpoints: etcd, DialTimeout: 5 * time.Second})
	if err != nil {
		log.Fatalf("etcd: %v", err)
	}
	em, err := endpoints.NewManager(cli, target)
	if err != nil {
		log.Fatalf("endpoints manager: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lease, err := cli.Grant(ctx, ttl)
	if err != nil {
		log.Fatalf("lease: %v", err)
	}
	alive, err := cli.KeepAlive(context.Background(), lease.ID)
	if err != nil {
		log.Fatalf("keepalive: %v", err)
	}
	go func() {
		for range alive {
		}
	}()
	metadata := map[string]any{"instance": id, "version": "go"}
	if weight > 0 {
		metadata["weight"] = weight
	}
	if tlsOn {
		metadata["tls"] = true
	}
	if err := em.AddEndpoint(ctx, key, endpoints.Endpoint{Addr: addr, Metadata: metadata}, clientv3.WithLease(lease.ID)); err != nil {
		log.Fatalf("register %s: %v", key, err)
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if err := em.DeleteEndpoint(ctx, key); err != nil {
			log.Printf("deregister %s: %v", key, err)
		}
		_, _ = cli.Revoke(ctx, lease.ID)
		_ = cli.Close()
	}
}
