// Command adsload is the load generator of benchmarks/ads_scale.py: many lightweight ADS
// clients (state of the world or delta) on a few gRPC connections, each behaving like an Envoy
// that ACKs every response at once.
//
// It is kept light so that it is not the bottleneck: messages are encoded and decoded by hand
// with protowire (only the few fields a client needs; resources are skipped, not decoded), and
// every stream is one goroutine.
//
// Protocol: commands on stdin, one JSON object per line on stdout.
//
//	start            open every stream at once (no ramp); prints {"event":"ready",...} once every
//	                 stream has received and ACKed CDS, EDS, LDS and RDS (or at -ready-timeout)
//	wait V T0 S      wait up to S seconds until every live stream has received EDS version V;
//	                 T0 is the wall-clock time (Unix ns) of the change; prints the latencies
//	stats            prints stream counts: live, lost (ended by the server or an error), by code
//	quit             closes everything and exits
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	typeCluster  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	typeEndpoint = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	typeListener = "type.googleapis.com/envoy.config.listener.v3.Listener"
	typeRoute    = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	service      = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
)

// rawCodec passes already-encoded messages through gRPC.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

var (
	addr         = flag.String("addr", "127.0.0.1:15010", "ADS server address")
	streams      = flag.Int("streams", 1000, "number of ADS streams (one node id each)")
	conns        = flag.Int("conns", 10, "gRPC connections the streams are spread over")
	delta        = flag.Bool("delta", false, "incremental xDS instead of state of the world")
	services     = flag.Int("services", 1000, "EDS names requested: svc-0 .. svc-(N-1)")
	nodePrefix   = flag.String("node-prefix", "node-", "node id prefix (node-0, node-1, ...)")
	nodeOffset   = flag.Int("node-offset", 0, "first node index")
	readyTimeout = flag.Duration("ready-timeout", 600*time.Second, "give up waiting for ready")
	reconnect    = flag.Bool("reconnect", false, "reopen a stream that ended (like Envoy)")
)

type stream struct {
	node   string
	ready  atomic.Bool
	mu     sync.Mutex
	seen   map[string]int64 // EDS version -> first seen (Unix ns)
	latest map[string]string
}

type state struct {
	mu        sync.Mutex
	out       *json.Encoder
	streams   []*stream
	live      atomic.Int64
	ready     atomic.Int64
	lost      atomic.Int64
	reconns   atomic.Int64
	codes     map[string]int
	sample    map[string]string // code -> one error message
	readyCh   chan struct{}
	readyOnce sync.Once
}

func (s *state) emit(v map[string]any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_ = s.out.Encode(v)
}

func appendString(b []byte, num protowire.Number, v string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, v)
}

func nodeMsg(id string) []byte {
	var n []byte
	n = appendString(n, 1, id)
	n = appendString(n, 2, "bench")
	return n
}

// sotwRequest: DiscoveryRequest{version_info=1, node=2, resource_names=3, type_url=4,
// response_nonce=5}.
func sotwRequest(node, typeURL, version, nonce string, names []string) []byte {
	var b []byte
	if version != "" {
		b = appendString(b, 1, version)
	}
	if node != "" {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, nodeMsg(node))
	}
	for _, n := range names {
		b = appendString(b, 3, n)
	}
	b = appendString(b, 4, typeURL)
	if nonce != "" {
		b = appendString(b, 5, nonce)
	}
	return b
}

// deltaRequest: DeltaDiscoveryRequest{node=1, type_url=2, resource_names_subscribe=3,
// response_nonce=6}.
func deltaRequest(node, typeURL, nonce string, subscribe []string) []byte {
	var b []byte
	if node != "" {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, nodeMsg(node))
	}
	b = appendString(b, 2, typeURL)
	for _, n := range subscribe {
		b = appendString(b, 3, n)
	}
	if nonce != "" {
		b = appendString(b, 6, nonce)
	}
	return b
}

// parseResponse reads version (field 1), type_url (4) and nonce (5) of a DiscoveryResponse or
// DeltaDiscoveryResponse (same numbers), skipping everything else.
func parseResponse(b []byte) (version, typeURL, nonce string, err error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", "", "", protowire.ParseError(n)
		}
		b = b[n:]
		if typ == protowire.BytesType && (num == 1 || num == 4 || num == 5) {
			v, m := protowire.ConsumeString(b)
			if m < 0 {
				return "", "", "", protowire.ParseError(m)
			}
			switch num {
			case 1:
				version = v
			case 4:
				typeURL = v
			case 5:
				nonce = v
			}
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return "", "", "", protowire.ParseError(m)
		}
		b = b[m:]
	}
	return
}

func (s *state) run(ctx context.Context, cc *grpc.ClientConn, st *stream, names []string) {
	for {
		began := time.Now()
		err := s.once(ctx, cc, st, names)
		if ctx.Err() != nil {
			return
		}
		code := status.Code(err).String()
		if err == io.EOF {
			code = "EOF"
		}
		s.lost.Add(1)
		s.mu.Lock()
		s.codes[code]++
		if _, ok := s.sample[code]; !ok && err != nil {
			s.sample[code] = fmt.Sprintf("%v (after %.1f s, ready %v)", err, time.Since(began).Seconds(), st.ready.Load())
		}
		if os.Getenv("ADSLOAD_DEBUG") != "" {
			fmt.Fprintf(os.Stderr, "lost %s after %.1f s ready=%v: %v\n", st.node, time.Since(began).Seconds(), st.ready.Load(), err)
		}
		s.mu.Unlock()
		if !*reconnect {
			return
		}
		s.reconns.Add(1)
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *state) once(ctx context.Context, cc *grpc.ClientConn, st *stream, names []string) error {
	method := "StreamAggregatedResources"
	if *delta {
		method = "DeltaAggregatedResources"
	}
	desc := &grpc.StreamDesc{StreamName: method, ServerStreams: true, ClientStreams: true}
	cs, err := cc.NewStream(ctx, desc, service+method, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}
	s.live.Add(1)
	defer s.live.Add(-1)
	send := func(b []byte) error { return cs.SendMsg(&b) }
	namesFor := func(t string) []string {
		switch t {
		case typeEndpoint:
			return names
		case typeRoute:
			return []string{"outbound"}
		}
		return nil
	}
	for i, t := range []string{typeCluster, typeEndpoint, typeListener, typeRoute} {
		node := ""
		if i == 0 {
			node = st.node
		}
		var msg []byte
		if *delta {
			msg = deltaRequest(node, t, "", namesFor(t))
		} else {
			msg = sotwRequest(node, t, "", "", namesFor(t))
		}
		if err := send(msg); err != nil {
			return err
		}
	}
	got := map[string]bool{}
	for {
		var resp []byte
		if err := cs.RecvMsg(&resp); err != nil {
			return err
		}
		now := time.Now().UnixNano()
		version, typeURL, nonce, err := parseResponse(resp)
		if err != nil {
			return err
		}
		var ack []byte
		if *delta {
			ack = deltaRequest("", typeURL, nonce, nil)
		} else {
			ack = sotwRequest("", typeURL, version, nonce, namesFor(typeURL))
		}
		if err := send(ack); err != nil {
			return err
		}
		if typeURL == typeEndpoint {
			st.mu.Lock()
			if _, ok := st.seen[version]; !ok {
				st.seen[version] = now
			}
			st.mu.Unlock()
		}
		got[typeURL] = true
		if len(got) == 4 && !st.ready.Load() {
			st.ready.Store(true)
			if s.ready.Add(1) == int64(len(s.streams)) {
				s.readyOnce.Do(func() { close(s.readyCh) })
			}
		}
	}
}

func pct(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	k := int(q*float64(len(sorted)-1) + 0.5)
	return sorted[k]
}

func (s *state) wait(version string, t0 int64, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for {
		var lat []float64
		missing := 0
		for _, st := range s.streams {
			st.mu.Lock()
			at, ok := st.seen[version]
			st.mu.Unlock()
			if ok {
				lat = append(lat, float64(at-t0)/1e9)
			} else {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			sort.Float64s(lat)
			ev := map[string]any{
				"event": "converged", "version": version, "received": len(lat),
				"missing": missing, "live": s.live.Load(), "lost": s.lost.Load(),
			}
			if missing > 0 {
				ev["event"] = "timeout"
			}
			if len(lat) > 0 {
				ev["p50_s"] = pct(lat, 0.5)
				ev["p99_s"] = pct(lat, 0.99)
				ev["max_s"] = lat[len(lat)-1]
			}
			s.emit(ev)
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func main() {
	flag.Parse()
	s := &state{out: json.NewEncoder(os.Stdout), codes: map[string]int{}, sample: map[string]string{}, readyCh: make(chan struct{})}
	names := make([]string, *services)
	for i := range names {
		names[i] = "svc-" + strconv.Itoa(i)
	}
	for i := 0; i < *streams; i++ {
		s.streams = append(s.streams, &stream{
			node: *nodePrefix + strconv.Itoa(*nodeOffset+i), seen: map[string]int64{},
		})
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var clients []*grpc.ClientConn
	for i := 0; i < *conns; i++ {
		cc, err := grpc.NewClient(*addr,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)),
			grpc.WithInitialWindowSize(1<<20), grpc.WithInitialConnWindowSize(16<<20),
		)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		clients = append(clients, cc)
	}
	s.emit(map[string]any{"event": "hello", "streams": *streams, "conns": *conns})
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "start":
			t0 := time.Now()
			for i, st := range s.streams {
				go s.run(ctx, clients[i%len(clients)], st, names)
			}
			go func() {
				select {
				case <-s.readyCh:
				case <-time.After(*readyTimeout):
				}
				s.emit(map[string]any{
					"event": "ready", "seconds": time.Since(t0).Seconds(),
					"ready": s.ready.Load(), "live": s.live.Load(), "lost": s.lost.Load(),
				})
			}()
		case "wait":
			if len(f) != 4 {
				s.emit(map[string]any{"event": "error", "message": "usage: wait VERSION T0NS SECONDS"})
				continue
			}
			t0, _ := strconv.ParseInt(f[2], 10, 64)
			secs, _ := strconv.ParseFloat(f[3], 64)
			go s.wait(f[1], t0, time.Duration(secs*float64(time.Second)))
		case "stats":
			s.mu.Lock()
			codes := map[string]int{}
			for k, v := range s.codes {
				codes[k] = v
			}
			sample := map[string]string{}
			for k, v := range s.sample {
				sample[k] = v
			}
			s.mu.Unlock()
			s.emit(map[string]any{
				"event": "stats", "live": s.live.Load(), "ready": s.ready.Load(),
				"lost": s.lost.Load(), "reconnects": s.reconns.Load(), "codes": codes,
				"errors": sample,
			})
		case "quit":
			cancel()
			for _, cc := range clients {
				_ = cc.Close()
			}
			return
		}
	}
}
