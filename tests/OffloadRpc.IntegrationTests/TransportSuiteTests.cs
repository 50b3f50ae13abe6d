using System.Buffers.Binary;
using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Runtime.InteropServices;
using OffloadRpc.Grpc;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// One server process (OffloadRpc.TestPeer grpc-server) that serves the typed services both ways: over
/// shared memory and over gRPC on 127.0.0.1. Shared by the suite's two transports.
/// </summary>
public sealed class BothWaysServer : IAsyncLifetime
{
    private PeerProcess _process = null!;
    private string _endpoint = null!;

    public string SocketPath { get; private set; } = null!;

    public string GrpcAddress { get; private set; } = null!;

    /// <summary>The server process's id (its memory mappings are read from /proc).</summary>
    public int ProcessId => _process.Id;

    /// <summary>The same gRPC server on a Unix socket (Kestrel's ListenUnixSocket).</summary>
    public string GrpcSocketPath { get; private set; } = null!;

    public async Task InitializeAsync()
    {
        _endpoint = Endpoints.Unique("both");
        (_process, SocketPath, GrpcAddress, GrpcSocketPath) = await StartAsync(_endpoint);
    }

    /// <summary>Starts a server process serving both ways; returns it with its socket path, gRPC address and gRPC Unix socket.</summary>
    internal static Task<(PeerProcess Process, string SocketPath, string GrpcAddress, string GrpcSocketPath)> StartAsync(string endpoint)
    {
        PeerProcess process = PeerProcess.Start(["grpc-server", endpoint, "--traces"]); // spans and server metrics recorded for ServerLogAsync
        string[] ready = process.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ');
        return Task.FromResult((process, ready[1], ready[2], ready[3]));
    }

    public async Task DisposeAsync()
    {
        await _process.DisposeAsync();
        Endpoints.RemoveStale(_endpoint);
    }
}

[CollectionDefinition(Name)]
public sealed class TransportSuite : ICollectionFixture<BothWaysServer>
{
    public const string Name = "transport suite";
}

/// <summary>The end-to-end typed tests over shared memory.</summary>
[Collection(TransportSuite.Name)]
public sealed class SharedMemoryTransportTests(BothWaysServer server) : TransportTests(server)
{
    protected override Task<OffloadRpcConnection> ConnectAsync(OffloadRpcOptions options) => OffloadRpcConnection.ConnectAsync(Server.SocketPath, options);

    protected override string AddressOf(string socketPath, string grpcAddress) => socketPath;

    protected override bool ExpectSharedMemory => true;

    protected override string ExpectedCaller => $"{Environment.ProcessId}:{Interop.LinuxNative.GetEuid()}"; // SO_PEERCRED
}

/// <summary>The same tests over gRPC (the switch to shared memory off, so every call crosses HTTP/2 on 127.0.0.1).</summary>
[Collection(TransportSuite.Name)]
public sealed class GrpcTransportTests(BothWaysServer server) : TransportTests(server)
{
    protected override Task<OffloadRpcConnection> ConnectAsync(OffloadRpcOptions options)
    {
        options.PreferSharedMemory = false;
        return OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, options);
    }

    protected override string AddressOf(string socketPath, string grpcAddress) => grpcAddress;

    protected override bool ExpectSharedMemory => false;

    protected override string ExpectedCaller => $"-1:{uint.MaxValue} unverified"; // nothing vouches for a caller over HTTP/2

    [Fact]
    public async Task A_client_on_the_servers_host_switches_to_shared_memory_unless_told_not_to()
    {
        await using OffloadRpcConnection local = await OffloadRpcConnection.ConnectAsync(Server.GrpcAddress);
        Assert.True(local.UsesSharedMemory);
        Assert.Equal(5, await local.GetService<IImageService>().AddAsync(2, 3));

        await using OffloadRpcConnection remote = await OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, new OffloadRpcOptions { PreferSharedMemory = false });
        Assert.False(remote.UsesSharedMemory);
        Assert.Equal(7, await remote.GetService<IImageService>().AddAsync(3, 4));
        Assert.True(local.PeerProcessId > 0); // verified by the shared-memory handshake
        Assert.Equal(-1, remote.PeerProcessId); // over gRPC the server's description is not proof
        Assert.Equal(uint.MaxValue, remote.PeerUserId);
    }

    [Theory]
    [InlineData(64 << 10, null)]
    [InlineData(null, 1 << 20)] // one byte short of a whole data frame
    public async Task Message_limits_below_one_frame_are_refused_when_connecting(int? send, int? receive)
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        options.ConfigureGrpcChannel(channel =>
        {
            channel.MaxSendMessageSize = send;
            channel.MaxReceiveMessageSize = receive;
        });
        ArgumentException refused = await Assert.ThrowsAsync<ArgumentException>(() => OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, options));
        Assert.Contains("1,048,577", refused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_request_above_the_channels_send_limit_fails_the_call_and_the_connection_serves_on()
    {
        const int limit = (1 << 20) + 1; // the least the transport takes: one whole data frame
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        options.ConfigureGrpcChannel(channel => channel.MaxSendMessageSize = limit);
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, options);
        string large = new('x', 2 << 20); // its MessagePack goes in the head frame, above the limit

        // A unary call, and a call that writes its request itself (a streamed argument): before this was
        // caught the second waited for ever for the rest of a request gRPC had refused to send.
        OffloadRpcException unary = await Assert.ThrowsAsync<OffloadRpcException>(() => connection.GetService<IKitchenSink>().ConcatAsync(large, "y"));
        Assert.Contains("too large", unary.Message, StringComparison.Ordinal);
        OffloadRpcException streamed = await Assert.ThrowsAsync<OffloadRpcException>(async () =>
            await connection.GetService<IFrameSource>().SlowDrainAsync(large, Values(), 0).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Contains("too large", streamed.Message, StringComparison.Ordinal);

        // The same refusal on a call whose result is a stream (its reader, not the reply's, meets it).
        IFrameSource frames = connection.GetService<IFrameSource>();
        OffloadRpcException duplex = await Assert.ThrowsAsync<OffloadRpcException>(async () =>
        {
            await foreach (int length in frames.LabelLengthsAsync(Ticks(large)).WithCancellation(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token))
            {
                Assert.Fail($"an item came back ({length}) for a tick gRPC refused to send");
            }
        });
        Assert.Contains("too large", duplex.Message, StringComparison.Ordinal);
        Assert.True(connection.IsConnected);
        int[] lengths = await frames.LabelLengthsAsync(Ticks("a", "bb")).ToArrayAsync();
        Assert.Equal(new[] { 1, 2 }, lengths);

        // Buffers cross in data frames of exactly the limit, and the connection serves on.
        byte[] buffer = new byte[(3 << 20) + 17];
        new Random(15).NextBytes(buffer);
        IImageService images = connection.GetService<IImageService>();
        Assert.Equal(Checksum64.Compute(buffer), await images.ChecksumAsync(buffer));
        Assert.Equal(3, await images.AddAsync(1, 2));

        static async IAsyncEnumerable<Tick> Ticks(params string[] labels)
        {
            for (int i = 0; i < labels.Length; i++)
            {
                await Task.Yield();
                yield return new Tick { Index = i, Label = labels[i] };
            }
        }

        static async IAsyncEnumerable<int> Values()
        {
            for (int i = 0; i < 3; i++)
            {
                await Task.Yield();
                yield return i;
            }
        }
    }

    [Fact]
    public async Task A_call_pending_when_its_connection_is_disposed_ends_saying_so_not_that_the_server_went_away()
    {
        OffloadRpcConnection connection = await ConnectAsync(new OffloadRpcOptions());
        Task pending = connection.GetService<IKitchenSink>().SleepAsync(60_000, CancellationToken.None);
        await connection.DisposeAsync();
        PeerDisconnectedException ended = await Assert.ThrowsAsync<PeerDisconnectedException>(() => pending.WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.Contains("was disposed", ended.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_Stream_argument_larger_than_one_array_fails_before_anything_is_read_or_sent()
    {
        await using OffloadRpcConnection connection = await ConnectAsync(new OffloadRpcOptions());
        var huge = new ClaimedLengthStream(3L << 30); // over gRPC a Stream argument is gathered into one array first
        ArgumentException refused = await Assert.ThrowsAsync<ArgumentException>(() => connection.GetService<IKitchenSink>().ConsumeStreamAsync(huge).AsTask());
        Assert.Contains(Array.MaxLength.ToString("N0", System.Globalization.CultureInfo.InvariantCulture), refused.Message, StringComparison.Ordinal);
        Assert.Equal(0, huge.Reads);
        Assert.Equal(3, await connection.GetService<IImageService>().AddAsync(1, 2));
    }

    /// <summary>A seekable stream that claims <paramref name="length"/> bytes and counts the reads asked of it.</summary>
    private sealed class ClaimedLengthStream(long length) : Stream
    {
        public int Reads { get; private set; }

        public override bool CanRead => true;

        public override bool CanSeek => true;

        public override bool CanWrite => false;

        public override long Length => length;

        public override long Position { get; set; }

        public override int Read(byte[] buffer, int offset, int count)
        {
            Reads++;
            return 0;
        }

        public override void Flush()
        {
        }

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

        public override void SetLength(long value) => throw new NotSupportedException();

        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    [Fact]
    public async Task A_reply_above_the_channels_receive_limit_fails_the_call_as_too_large_not_as_a_remote_fault()
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        options.ConfigureGrpcChannel(channel => channel.MaxReceiveMessageSize = (1 << 20) + 1);
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, options);
        IKitchenSink sink = connection.GetService<IKitchenSink>();
        OffloadRpcException refused = await Assert.ThrowsAsync<OffloadRpcException>(() => sink.ConcatAsync(new string('x', 3 << 19), "y")); // 1.5 MiB back in one frame
        Assert.Contains("too large", refused.Message, StringComparison.Ordinal);
        Assert.Equal("ab", await sink.ConcatAsync("a", "b"));
    }

    [Fact]
    public async Task Over_a_Unix_socket_the_kernel_vouches_for_the_caller_of_a_gRPC_call()
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        string path = Server.GrpcSocketPath;
        options.ConfigureGrpcChannel(channel => channel.HttpHandler = new System.Net.Http.SocketsHttpHandler
        {
            ConnectCallback = async (_, cancellationToken) =>
            {
                var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(new System.Net.Sockets.UnixDomainSocketEndPoint(path), cancellationToken);
                    return new System.Net.Sockets.NetworkStream(socket, ownsSocket: true);
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            },
        });
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync("http://localhost", options);
        Assert.False(connection.UsesSharedMemory);
        IKitchenSink sink = connection.GetService<IKitchenSink>();

        // SO_PEERCRED of the HTTP/2 connection: this process, verified. The connection's first calls ask at
        // once, on streams the server runs side by side; later calls get the same.
        string expected = $"{Environment.ProcessId}:{Interop.LinuxNative.GetEuid()}";
        string[] first = await Task.WhenAll(Enumerable.Range(0, 16).Select(_ => sink.WhoCalledAsync()));
        Assert.All(first, caller => Assert.Equal(expected, caller));
        Assert.Equal(expected, await sink.WhoCalledAsync());
        using (OffloadCallScope.Begin().WithHeader("offloadrpc-peer", "1:0"))
        {
            Assert.Equal(expected, await sink.WhoCalledAsync()); // a claim in a header changes nothing
        }
    }

    [Fact]
    public async Task A_caller_that_claims_an_identity_in_a_header_is_not_reported_as_that_caller()
    {
        await using OffloadRpcConnection forger = await ConnectOverGrpcAsync(new ClaimingHandler(new System.Net.Http.SocketsHttpHandler()));
        using (OffloadCallScope.Begin().WithHeader("offloadrpc-peer", "1:0"))
        {
            Assert.Equal(ExpectedCaller, await forger.GetService<IKitchenSink>().WhoCalledAsync());
        }

        Assert.True(ClaimingHandler.Sent > 0, "the forged header went out");
    }

    /// <summary>Adds "offloadrpc-peer: 1:0" (pid 1, root) to every request, as a hostile client could.</summary>
    private sealed class ClaimingHandler(System.Net.Http.HttpMessageHandler inner) : System.Net.Http.DelegatingHandler(inner)
    {
        public static int Sent;

        protected override Task<System.Net.Http.HttpResponseMessage> SendAsync(System.Net.Http.HttpRequestMessage request, CancellationToken cancellationToken)
        {
            request.Headers.TryAddWithoutValidation("offloadrpc-peer", "1:0");
            request.Headers.TryAddWithoutValidation("offloadrpc-peer-bin", Convert.ToBase64String("1:0"u8));
            Interlocked.Increment(ref Sent);
            return base.SendAsync(request, cancellationToken);
        }
    }

    [Fact]
    public async Task Each_call_is_the_least_streaming_gRPC_call_its_method_and_request_need()
    {
        var logs = new CollectingLoggerFactory(); // Grpc.Net.Client logs each call's method type as it starts
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, new OffloadRpcOptions { PreferSharedMemory = false, LoggerFactory = logs });
        IImageService images = connection.GetService<IImageService>();
        byte[] small = new byte[64];
        Checksum64.Fill(small, 64);
        byte[] large = new byte[3 << 20];
        Checksum64.Fill(large, 3);

        Assert.Equal(5, await images.AddAsync(2, 3));
        Assert.Equal(Checksum64.Compute(small), await images.ChecksumAsync(small));
        Assert.Equal(Checksum64.Compute(large), await images.ChecksumAsync(large));
        Assert.Equal(small, await images.EchoAsync(small));
        Assert.Equal(large, await images.EchoAsync(large));
        using (SharedBuffer rendered = await images.RenderAsync(64, 48))
        {
            byte[] expected = new byte[64 * 48 * 3];
            Checksum64.Fill(expected, (64 * 31) + 48);
            Assert.Equal(Checksum64.Compute(expected), Checksum64.Compute(rendered.Span));
        }

        string[] calls = logs.Entries
            .Where(e => e.EventName == "StartingCall" && e.Message.Contains("/OffloadRpc.TestContracts.IImageService/", StringComparison.Ordinal))
            .Select(e => System.Text.RegularExpressions.Regex.Match(e.Message, "Method type: '(\\w+)', URI: '.*/(\\w+)'"))
            .Select(m => $"{m.Groups[2].Value} {m.Groups[1].Value}")
            .ToArray();
        Assert.Equal(
            [
                "AddAsync Unary", // bound unary
                "ChecksumAsync Unary", // bound client streaming; a one-frame request goes as a unary call
                "ChecksumAsync ClientStreaming", // 1 MiB frames
                "EchoAsync ServerStreaming", // bound duplex; a one-frame request needs no request stream
                "EchoAsync DuplexStreaming",
                "RenderAsync ServerStreaming", // bound server streaming
            ],
            calls);
    }

    [Fact]
    public async Task A_server_that_does_not_advertise_its_shared_memory_keeps_clients_on_gRPC_and_tells_nothing_of_its_host()
    {
        string endpoint = Endpoints.Unique("no-advertise");
        await using (PeerProcess process = PeerProcess.Start(["grpc-server", endpoint, "--no-advertise"]))
        {
            string address = process.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2];
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address); // prefers shared memory
            Assert.False(connection.UsesSharedMemory);
            byte[] data = new byte[(2 << 20) + 3];
            Checksum64.Fill(data, 21);
            Assert.Equal(Checksum64.Compute(data), await connection.GetService<IImageService>().ChecksumAsync(data));

            using var channel = global::Grpc.Net.Client.GrpcChannel.ForAddress(address);
            OffloadRpc.Grpc.Internal.Frame answer = await channel.CreateCallInvoker().AsyncUnaryCall(
                OffloadRpc.Grpc.Internal.GrpcWire.Describe, null, default, new OffloadRpc.Grpc.Internal.Frame(OffloadRpc.Grpc.Internal.FrameKind.Head, default)).ResponseAsync;
            OffloadRpc.Grpc.Internal.ServerDescription description = OffloadRpc.Grpc.Internal.ServerDescription.Decode(answer.First);
            answer.Release();
            Assert.Equal(string.Empty, description.BootId);
            Assert.Null(description.SocketPath);
            Assert.Equal(-1, description.ProcessId);
            Assert.Equal(uint.MaxValue, description.UserId);
            Assert.Contains(typeof(IImageService).FullName!, description.Contracts.Keys);
        }

        Endpoints.RemoveStale(endpoint);
    }

    [Fact]
    public async Task A_unary_request_above_Kestrels_body_limit_crosses_when_the_message_limit_allows_it()
    {
        string endpoint = Endpoints.Unique("large-body");
        await using (PeerProcess process = PeerProcess.Start(["grpc-server", endpoint, "--max-message-bytes", (64 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture)]))
        {
            string address = process.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2];
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false, MaxMessageBytes = 64 << 20 });
            string a = new('a', 20_000_000);
            string b = new('b', 20_000_000); // a 40 MB MessagePack body, one frame of a unary call: Kestrel refuses bodies above 30 MB unless told not to
            string joined = await connection.GetService<IKitchenSink>().ConcatAsync(a, b);
            Assert.Equal(40_000_000, joined.Length);
            Assert.True(joined.AsSpan(0, 20_000_000).SequenceEqual(a) && joined.AsSpan(20_000_000).SequenceEqual(b));
        }

        Endpoints.RemoveStale(endpoint);
    }

    [Fact]
    public async Task The_frames_of_a_replys_buffer_are_read_into_its_lease_as_they_arrive()
    {
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, new OffloadRpcOptions { PreferSharedMemory = false });
        byte[] data = new byte[(5 << 20) + 7]; // six 1 MiB frames after the head
        Checksum64.Fill(data, 55);
        long before = OffloadRpc.Grpc.Internal.MessageAssembler.FramesFilledInPlace;
        byte[] echoed = await connection.GetService<IImageService>().EchoAsync(data);
        Assert.Equal(Checksum64.Compute(data), Checksum64.Compute(echoed));
        Assert.Equal(6, OffloadRpc.Grpc.Internal.MessageAssembler.FramesFilledInPlace - before); // not copied through a pooled array first
    }

    [Fact]
    public async Task A_metadata_header_that_does_not_decode_fails_that_call_alone()
    {
        var forging = new MetadataHandler(new System.Net.Http.SocketsHttpHandler());
        await using OffloadRpcConnection connection = await ConnectOverGrpcAsync(forging);
        IImageService images = connection.GetService<IImageService>();
        byte[] large = new byte[3 << 20]; // read in 1 MiB frames only once the header decoded
        Checksum64.Fill(large, 5);

        forging.Value = "not base64!";
        foreach (Func<Task> call in new Func<Task>[] { () => images.AddAsync(1, 2).AsTask(), () => images.ChecksumAsync(large).AsTask() })
        {
            RemoteInvocationException refused = await Assert.ThrowsAsync<RemoteInvocationException>(call);
            Assert.Equal(typeof(global::Grpc.Core.RpcException).FullName, refused.RemoteExceptionType);
            Assert.StartsWith("InvalidArgument: The offloadrpc-metadata-bin header is not base64", refused.RemoteMessage, StringComparison.Ordinal);
        }

        forging.Value = Convert.ToBase64String([0xc1, 0xc1, 0xc1]); // base64, but no metadata block
        foreach (Func<Task> call in new Func<Task>[] { () => images.AddAsync(1, 2).AsTask(), () => images.ChecksumAsync(large).AsTask() })
        {
            ProtocolViolationException violation = await Assert.ThrowsAsync<ProtocolViolationException>(call);
            Assert.StartsWith("The server refused the call as a protocol violation", violation.Message, StringComparison.Ordinal);
        }

        forging.Value = null;
        Assert.Equal(3, await images.AddAsync(1, 2)); // the server and the connection serve on
        Assert.Equal(Checksum64.Compute(large), await images.ChecksumAsync(large));
    }

    [Theory]
    [InlineData("OffloadRpc.TestContracts.IImageService", "AddAsync")] // bound unary
    [InlineData("OffloadRpc.TestContracts.IImageService", "ChecksumAsync")] // bound client streaming: its first frame read by the route itself
    [InlineData("OffloadRpc.TestContracts.IImageService", "EchoAsync")] // bound duplex
    [InlineData("offloadrpc.Server", "Describe")] // the server's description, which a client asks for first
    public async Task A_first_frame_that_is_not_a_frame_is_refused_as_a_protocol_violation(string service, string method)
    {
        using var channel = global::Grpc.Net.Client.GrpcChannel.ForAddress(Server.GrpcAddress);
        var raw = new global::Grpc.Core.Marshaller<byte[]>(static bytes => bytes, static bytes => bytes);
        var call = new global::Grpc.Core.Method<byte[], byte[]>(global::Grpc.Core.MethodType.Unary, service, method, raw, raw);
        foreach (byte[] message in new[] { new byte[] { 0x09, 1, 2, 3 }, [] }) // an unknown kind; no kind at all
        {
            global::Grpc.Core.RpcException refused = await Assert.ThrowsAsync<global::Grpc.Core.RpcException>(() => channel.CreateCallInvoker().AsyncUnaryCall(call, null, default, message).ResponseAsync);
            Assert.Equal(global::Grpc.Core.StatusCode.Internal, refused.StatusCode);
            Assert.StartsWith("A gRPC frame of ", refused.Trailers.GetValue(OffloadRpc.Grpc.Internal.GrpcWire.ViolationTrailer), StringComparison.Ordinal);
        }

        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, new OffloadRpcOptions { PreferSharedMemory = false });
        Assert.Equal(3, await connection.GetService<IImageService>().AddAsync(1, 2)); // the server serves on
    }

    /// <summary>A gRPC connection (never switched to shared memory) whose requests go through <paramref name="handler"/>.</summary>
    private Task<OffloadRpcConnection> ConnectOverGrpcAsync(System.Net.Http.HttpMessageHandler handler)
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        options.ConfigureGrpcChannel(channel => channel.HttpHandler = handler);
        return OffloadRpcConnection.ConnectAsync(Server.GrpcAddress, options);
    }

    /// <summary>Sends <see cref="Value"/> (when set) as the raw offloadrpc-metadata-bin header, as a broken or hostile client could.</summary>
    private sealed class MetadataHandler(System.Net.Http.HttpMessageHandler inner) : System.Net.Http.DelegatingHandler(inner)
    {
        public volatile string? Value;

        protected override Task<System.Net.Http.HttpResponseMessage> SendAsync(System.Net.Http.HttpRequestMessage request, CancellationToken cancellationToken)
        {
            if (Value is { } value && request.RequestUri?.AbsolutePath.StartsWith("/OffloadRpc.", StringComparison.Ordinal) == true)
            {
                request.Headers.Remove("offloadrpc-metadata-bin");
                request.Headers.TryAddWithoutValidation("offloadrpc-metadata-bin", value);
            }

            return base.SendAsync(request, cancellationToken);
        }
    }

    [Fact]
    public async Task A_deadline_of_any_kind_goes_as_gRPCs_own_grpc_timeout_and_a_call_without_one_sends_none()
    {
        var sent = new TimeoutHandler(new System.Net.Http.SocketsHttpHandler());
        await using OffloadRpcConnection connection = await ConnectOverGrpcAsync(sent);
        ICallProbe probe = connection.GetService<ICallProbe>();

        Assert.Empty(await probe.HeadersAsync());
        Assert.Null(sent.Last); // no deadline, no grpc-timeout (and no metadata block)

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromSeconds(30)))
        {
            Assert.Empty(await probe.HeadersAsync());
        }

        // grpc-timeout is an integer and a unit (H, M, S, m, u, n): 30 s from the scope, less the time since.
        string timeout = Assert.IsType<string>(sent.Last);
        TimeSpan value = ParseTimeout(timeout);
        Assert.InRange(value, TimeSpan.FromSeconds(20), TimeSpan.FromSeconds(30));

        var unspecified = new DateTime(DateTime.UtcNow.AddSeconds(30).Ticks, DateTimeKind.Unspecified); // read as UTC, as over shared memory
        using (OffloadCallScope.Begin().WithDeadline(unspecified))
        {
            Assert.Empty(await probe.HeadersAsync());
        }

        Assert.InRange(ParseTimeout(Assert.IsType<string>(sent.Last)), TimeSpan.FromSeconds(20), TimeSpan.FromSeconds(30));

        using (OffloadCallScope.Begin().WithDeadline(DateTime.MaxValue))
        {
            Assert.Empty(await probe.HeadersAsync()); // "no deadline to speak of" goes as the longest the block carries, not an overflow
        }

        Assert.True(ParseTimeout(Assert.IsType<string>(sent.Last)) > TimeSpan.FromDays(365));
    }

    private static TimeSpan ParseTimeout(string value)
    {
        long amount = long.Parse(value.AsSpan(0, value.Length - 1), System.Globalization.CultureInfo.InvariantCulture);
        return value[^1] switch
        {
            'H' => TimeSpan.FromHours(amount),
            'M' => TimeSpan.FromMinutes(amount),
            'S' => TimeSpan.FromSeconds(amount),
            'm' => TimeSpan.FromMilliseconds(amount),
            'u' => TimeSpan.FromMicroseconds(amount),
            'n' => TimeSpan.FromTicks(amount / 100),
            _ => throw new FormatException($"grpc-timeout '{value}' has no unit"),
        };
    }

    /// <summary>Keeps the grpc-timeout header of the last OffloadRpc call (null when it had none).</summary>
    private sealed class TimeoutHandler(System.Net.Http.HttpMessageHandler inner) : System.Net.Http.DelegatingHandler(inner)
    {
        public volatile string? Last;

        protected override Task<System.Net.Http.HttpResponseMessage> SendAsync(System.Net.Http.HttpRequestMessage request, CancellationToken cancellationToken)
        {
            if (request.RequestUri?.AbsolutePath.StartsWith("/OffloadRpc.", StringComparison.Ordinal) == true)
            {
                Last = request.Headers.TryGetValues("grpc-timeout", out IEnumerable<string>? values) ? values.Single() : null;
            }

            return base.SendAsync(request, cancellationToken);
        }
    }

    [Fact]
    public async Task An_address_that_serves_nothing_fails_with_PeerDisconnectedException()
    {
        using var listener = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        listener.Start();
        int port = ((System.Net.IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop(); // nothing listens there now
        await Assert.ThrowsAsync<PeerDisconnectedException>(() => OffloadRpcConnection.ConnectAsync($"http://127.0.0.1:{port}"));
    }
}

/// <summary>The typed tests every transport passes, against the server of the <see cref="BothWaysServer"/> fixture.</summary>
public abstract class TransportTests(BothWaysServer server) : IAsyncLifetime
{
    private OffloadRpcConnection _connection = null!;

    protected BothWaysServer Server { get; } = server;

    protected abstract Task<OffloadRpcConnection> ConnectAsync(OffloadRpcOptions options);

    protected abstract string AddressOf(string socketPath, string grpcAddress);

    protected abstract bool ExpectSharedMemory { get; }

    /// <summary>What IKitchenSink.WhoCalledAsync reports of this process over the transport: "pid:uid", and " unverified" when the kernel did not vouch for them.</summary>
    protected abstract string ExpectedCaller { get; }

    public async Task InitializeAsync()
    {
        _connection = await ConnectAsync(new OffloadRpcOptions());
        Assert.Equal(ExpectSharedMemory, _connection.UsesSharedMemory);
    }

    public async Task DisposeAsync() => await _connection.DisposeAsync();

    private IImageService Images => _connection.GetService<IImageService>();

    private IKitchenSink Sink => _connection.GetService<IKitchenSink>();

    private ICallProbe Probe => _connection.GetService<ICallProbe>();

    private IFrameSource Frames => _connection.GetService<IFrameSource>();

    private IUploadProbe Uploads => _connection.GetService<IUploadProbe>();

    [Fact]
    public async Task The_design_example_and_every_parameter_kind_cross()
    {
        Assert.Equal(5, await Images.AddAsync(2, 3));
        byte[] data = new byte[100_000];
        Checksum64.Fill(data, 1);
        Assert.Equal(data, await Images.EchoAsync(data));
        byte[] batch = new byte[64 * 1024];
        for (int i = 0; i < batch.Length; i++)
        {
            batch[i] = (byte)(i / 1024 % 2 == 0 ? 250 : 10);
        }

        Detection[] detections = await Images.DetectAsync(batch, new DetectOptions { Threshold = 0.5f, Label = "bright", Classes = [1, 2] });
        Assert.Equal(32, detections.Length);

        Assert.Equal("ab", await Sink.ConcatAsync("a", "b"));
        Assert.Equal("a<null>", await Sink.ConcatAsync("a", null));
        await Sink.DoNothingAsync();
        Assert.Equal(Channel.Blue, await Sink.NextChannelAsync(Channel.Green));
        Assert.Equal(new[] { "x", "y", "z" }, await Sink.SplitAsync("x,y,z", ','));
        Assert.Equal(new[] { 2.0, 5.0 }, await Sink.ScaleAsync([1.0, 2.5], 2));
        Assert.Equal(1.5 + 2.5 + 10 + 20, await Sink.SumAsync(new float[] { 1.5f, 2.5f }, new int[] { 10, 20 }));
        using SharedBuffer third = _connection.Rent(300);
        Assert.Equal(100 + 200 + 300 + 400, await Sink.TotalLengthAsync(new byte[100], new byte[200], third, new byte[400]));
        Assert.Equal(new byte[] { 3, 2, 1 }, (await Sink.ReverseAsync(new byte[] { 1, 2, 3 })).ToArray());
        Assert.Equal(new[] { -1, -2 }, await Sink.MaybeAsync([1, 2]));
        Assert.Null(await Sink.MaybeAsync(null));
        Assert.Equal(new[] { "a=1", "b=0" }, await Sink.WordsAsync(["a", "b"], new Dictionary<string, int> { ["a"] = 1 }));
        Assert.Equal(3.75m, await Sink.AddDecimalAsync(1.25m, 2.5m));
        var moment = new DateTime(2026, 11, 25, 12, 0, 0, DateTimeKind.Utc);
        Assert.Equal(moment.AddHours(3), await Sink.ShiftAsync(moment, TimeSpan.FromHours(3)));
        Assert.Equal((4, "abab"), await Sink.TupleAsync(2, "ab"));
        Assert.Equal(ExpectedCaller, await Sink.WhoCalledAsync());
    }

    [Fact]
    public async Task A_256_MiB_argument_and_a_256_MiB_result_cross_intact()
    {
        const int Size = 256 << 20; // over gRPC: 256 chunked frames each way, never one large message
        byte[]? frame = GC.AllocateUninitializedArray<byte>(Size);
        Checksum64.Fill(frame, 256);
        ulong expected = Checksum64.Compute(frame);
        Assert.Equal(expected, await Images.ChecksumAsync(frame)); // the server's checksum of what arrived
        frame = null; // not kept while the result arrives

        byte[] result = await Frames.FillAsync(Size, 256); // the server fills the same bytes from the same seed
        Assert.Equal(Size, result.Length);
        Assert.Equal(expected, Checksum64.Compute(result));
    }

    [Fact]
    public async Task SharedBuffer_arguments_and_results_cross()
    {
        using (SharedBuffer rendered = await Images.RenderAsync(640, 480))
        {
            byte[] expected = new byte[640 * 480 * 3];
            Checksum64.Fill(expected, 640 * 31 + 480);
            Assert.Equal(Checksum64.Compute(expected), Checksum64.Compute(rendered.Span));
        }

        SharedBuffer frame = _connection.Rent(3 << 20);
        Checksum64.Fill(frame.Span[8..], 4);
        BinaryPrimitives.WriteUInt64LittleEndian(frame.Span, Checksum64.Compute(frame.Span[8..]));
        await Images.ProcessAsync(frame);
        Assert.False(frame.IsValid); // ownership moved with the call, on either transport

        SharedBuffer bad = _connection.Rent(1000);
        bad.Span.Fill(1);
        var ex = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await Images.ProcessAsync(bad));
        Assert.Equal(typeof(InvalidDataException).FullName, ex.RemoteExceptionType);
        Assert.Null(await Sink.MaybeLeaseAsync(-1));
    }

    [Fact]
    public async Task Cancellation_reaches_the_server_and_the_caller_gets_OperationCanceledException()
    {
        int before = await Sink.CancellationsObservedAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => Sink.SleepAsync(60_000, cts.Token));
        await Eventually.TrueAsync(async () => await Sink.CancellationsObservedAsync() > before, "the server's token fired");
    }

    [Fact]
    public async Task Server_exceptions_surface_as_RemoteInvocationException()
    {
        var ex = await Assert.ThrowsAsync<RemoteInvocationException>(() => Sink.FailAsync("no such frame"));
        Assert.Equal(typeof(InvalidOperationException).FullName, ex.RemoteExceptionType);
        Assert.Equal("no such frame", ex.RemoteMessage);
        Assert.Contains(nameof(IKitchenSink.FailAsync), ex.RemoteStackTrace);
        Assert.Contains("\n   at ", ex.RemoteStackTrace, StringComparison.Ordinal); // its lines as thrown, on either transport
    }

    [Fact]
    public async Task Headers_deadlines_and_server_interceptors_apply()
    {
        using (OffloadCallScope.Begin().WithHeader("tenant", "acme").WithHeader("ünïcode", "välue ✓"))
        {
            Assert.Equal(["tenant=acme", "ünïcode=välue ✓"], await Probe.HeadersAsync());
        }

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(300)))
        {
            DeadlineExceededException exceeded = await Assert.ThrowsAsync<DeadlineExceededException>(async () => await Probe.WaitForCancelAsync(60_000));
            Assert.Equal("/OffloadRpc.TestContracts.ICallProbe/WaitForCancelAsync", exceeded.Method);
        }

        await Eventually.TrueAsync(async () => await Probe.LastOutcomeAsync() == "cancelled deadline=yes", "the server's token fired at the deadline");

        using (OffloadCallScope.Begin().WithHeader("deny", "no tenant"))
        {
            var denied = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await Probe.PingAsync());
            Assert.Equal(typeof(UnauthorizedAccessException).FullName, denied.RemoteExceptionType);
        }
    }

    [Theory]
    [InlineData(64)] // over gRPC the request is one frame: a unary call
    [InlineData(3 << 20)] // over gRPC 1 MiB frames: a client-streaming call
    public async Task A_call_with_a_buffer_argument_keeps_headers_deadlines_cancellation_interceptors_and_faults(int size)
    {
        byte[] data = new byte[size];
        Checksum64.Fill(data, (ulong)size);
        ulong checksum = Checksum64.Compute(data);
        string tenant = "acme-" + Guid.NewGuid().ToString("N"); // this run's, not another transport's
        using (OffloadCallScope.Begin().WithHeader("tenant", tenant))
        {
            Assert.Equal($"{checksum} headers=tenant={tenant}", await Uploads.ChecksumAfterAsync(data, 0));
        }

        await Eventually.TrueAsync(
            async () => (await Probe.ServerLogAsync()).Any(l => l.StartsWith("intercepted ChecksumAfterAsync request=", StringComparison.Ordinal) && l.EndsWith($"+{size} result={checksum} headers=tenant={tenant} ok", StringComparison.Ordinal)),
            "the server's interceptor saw the call with its buffer");

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(300)))
        {
            DeadlineExceededException exceeded = await Assert.ThrowsAsync<DeadlineExceededException>(async () => await Uploads.ChecksumAfterAsync(data, 60_000));
            Assert.Equal("/OffloadRpc.TestContracts.IUploadProbe/ChecksumAfterAsync", exceeded.Method);
        }

        await Eventually.TrueAsync(async () => await Probe.LastOutcomeAsync() == "cancelled deadline=yes", "the server's token fired at the deadline");

        using (var cancel = new CancellationTokenSource(TimeSpan.FromMilliseconds(300)))
        {
            await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await Uploads.ChecksumAfterAsync(data, 60_000, cancel.Token));
        }

        await Eventually.TrueAsync(async () => await Probe.LastOutcomeAsync() == "cancelled deadline=no", "the caller's cancellation reached the server's token");

        using (OffloadCallScope.Begin().WithHeader("deny", "no tenant"))
        {
            RemoteInvocationException denied = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await Uploads.ChecksumAfterAsync(data, 0));
            Assert.Equal(typeof(UnauthorizedAccessException).FullName, denied.RemoteExceptionType);
            Assert.Equal("denied: no tenant (/OffloadRpc.TestContracts.IUploadProbe/ChecksumAfterAsync of OffloadRpc.TestContracts.IUploadProbe)", denied.RemoteMessage);
        }

        SharedBuffer frame = _connection.Rent(size);
        data.CopyTo(frame.Span);
        RemoteInvocationException rejected = await Assert.ThrowsAsync<RemoteInvocationException>(() => Sink.RejectAsync(frame));
        Assert.Equal(typeof(InvalidOperationException).FullName, rejected.RemoteExceptionType);
        Assert.Equal($"rejected a frame of {size} bytes starting with {data[0]}", rejected.RemoteMessage);
        Assert.Contains(nameof(IKitchenSink.RejectAsync), rejected.RemoteStackTrace);
    }

    [Fact]
    public async Task Client_and_server_spans_share_the_trace_and_client_calls_are_measured_with_their_status()
    {
        const string Service = "OffloadRpc.TestContracts.ICallProbe";
        using var telemetry = new TelemetryRecorder(nameof(TransportTests));

        using var source = new ActivitySource(nameof(TransportTests));
        string[] server;
        Activity root;
        using (root = source.StartActivity("root")!)
        {
            server = (await Probe.TraceAsync()).Split(' '); // the server span as the server method saw it: "traceId parentSpanId spanId"
            await Assert.ThrowsAsync<RemoteInvocationException>(() => Sink.FailAsync("traced failure"));
        }

        Activity[] spans = telemetry.Spans;
        Activity client = spans.Single(a => a.TraceId == root.TraceId && a.Kind == ActivityKind.Client && a.DisplayName == Service + "/TraceAsync");
        Activity failed = spans.Single(a => a.TraceId == root.TraceId && a.Kind == ActivityKind.Client && a.DisplayName.EndsWith("/FailAsync", StringComparison.Ordinal));

        Assert.Equal(3, server.Length);
        Assert.Equal(root.TraceId.ToString(), server[0]); // one trace across both processes, over either transport
        Assert.Equal(client.SpanId.ToString(), server[1]); // the server span is the client span's child
        Assert.Equal("offloadrpc", client.GetTagItem("rpc.system"));
        Assert.Equal(Service, client.GetTagItem("rpc.service"));
        Assert.Equal("TraceAsync", client.GetTagItem("rpc.method"));
        Assert.Equal("ok", client.GetTagItem("rpc.offloadrpc.status_code"));
        Assert.Equal(ActivityStatusCode.Error, failed.Status);
        Assert.Equal("remote_error", failed.GetTagItem("rpc.offloadrpc.status_code"));
        Assert.Equal(typeof(InvalidOperationException).FullName, failed.GetTagItem("error.type"));
        await Eventually.TrueAsync(
            async () => (await Probe.ServerLogAsync()).Any(l => l.StartsWith($"span Server OffloadRpc.TestContracts.IKitchenSink/FailAsync {root.TraceId} parent={failed.SpanId} system=offloadrpc method=FailAsync status=error", StringComparison.Ordinal)),
            "the server process recorded the failed call's span, a child of the client's");

        string[] measured = telemetry.Measurements("rpc.system", "rpc.service", "rpc.method", "rpc.offloadrpc.status_code");
        Assert.Contains($"rpc.client.duration offloadrpc {Service} TraceAsync ok", measured);
        Assert.Contains($"offloadrpc.client.calls.completed offloadrpc {Service} TraceAsync ok", measured);
        Assert.Contains("rpc.client.duration offloadrpc OffloadRpc.TestContracts.IKitchenSink FailAsync remote_error", measured);
        Assert.Contains("offloadrpc.client.calls.completed offloadrpc OffloadRpc.TestContracts.IKitchenSink FailAsync remote_error", measured);
    }

    [Fact]
    public async Task A_streamed_result_carries_headers_and_deadline()
    {
        var items = new List<string>();
        using (OffloadCallScope.Begin().WithHeader("tenant", "acme"))
        {
            await foreach (string item in Probe.WatchAsync(2, 0))
            {
                items.Add(item);
            }
        }

        Assert.Equal(2, items.Count);
        Assert.All(items, i => Assert.Contains(" headers=tenant=acme deadline=no ", i, StringComparison.Ordinal));
        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(400)))
        {
            await Assert.ThrowsAsync<DeadlineExceededException>(async () =>
            {
                await foreach (string item in Probe.WatchAsync(50, 100))
                {
                    Assert.Contains(" deadline=yes ", item, StringComparison.Ordinal);
                }
            });
        }

        await Eventually.TrueAsync(async () => await Probe.LastOutcomeAsync() == "stream cancelled deadline=yes", "the producer's token fired at the deadline");
    }

    [Fact]
    public async Task Streamed_results_cross_item_by_item_and_end_with_the_reply_or_the_fault()
    {
        IFrameSource frames = _connection.GetService<IFrameSource>();
        int next = 0;
        await foreach (Tick tick in frames.TicksAsync(200, "t"))
        {
            Assert.Equal(next, tick.Index);
            Assert.Equal(Checksum64.Compute(BitConverter.GetBytes(next)), tick.Checksum);
            next++;
        }

        Assert.Equal(200, next);
        const int Size = 3 << 20; // each item larger than a gRPC frame: chunked
        int i = 0;
        await foreach (ReadOnlyMemory<byte> frame in frames.FramesAsync(12, Size, 100))
        {
            Assert.Equal(Size, frame.Length);
            Assert.Equal(FrameChecksum(Size, 100 + i), Checksum64.Compute(frame.Span));
            i++;
        }

        Assert.Equal(12, i);
        i = 0;
        await foreach (ReadOnlyMemory<int> numbers in frames.NumbersAsync(5, 5000))
        {
            Assert.Equal((i * 1000) + 4999, numbers.Span[4999]);
            i++;
        }

        var leases = new List<SharedBuffer>();
        await foreach (SharedBuffer lease in frames.RenderAsync(3, 1 << 20, 7))
        {
            leases.Add(lease); // ownership moved: valid after the stream
        }

        for (int j = 0; j < leases.Count; j++)
        {
            Assert.Equal(FrameChecksum(1 << 20, 7 + j), Checksum64.Compute(leases[j].Span));
            leases[j].Dispose();
        }

        var seen = new List<int>();
        var failed = await Assert.ThrowsAsync<RemoteInvocationException>(async () =>
        {
            await foreach (int value in frames.FailingAsync(3))
            {
                seen.Add(value);
            }
        });
        Assert.Equal([0, 1, 2], seen);
        Assert.Equal(typeof(InvalidOperationException).FullName, failed.RemoteExceptionType);
    }

    [Fact]
    public async Task Leaving_a_stream_early_cancels_the_producer()
    {
        IFrameSource frames = _connection.GetService<IFrameSource>();
        string tag = "early-" + Guid.NewGuid().ToString("N");
        int taken = 0;
        await foreach (ReadOnlyMemory<byte> frame in frames.EndlessAsync(tag, 4096))
        {
            Assert.Equal(FrameChecksum(4096, taken), Checksum64.Compute(frame.Span));
            if (++taken == 5)
            {
                break;
            }
        }

        await Eventually.TrueAsync(async () => (await frames.StatusAsync(tag)).Finished, "the producer finished");
        Assert.True((await frames.StatusAsync(tag)).Cancelled, "the producer's token fired");
        Assert.Equal(9, await Images.AddAsync(4, 5));
    }

    [Fact]
    public async Task Client_streaming_sends_MessagePack_items_and_gets_the_result()
    {
        static async IAsyncEnumerable<Tick> Ticks(int count)
        {
            for (int i = 0; i < count; i++)
            {
                yield return new Tick { Index = i, Checksum = Checksum64.Compute(BitConverter.GetBytes(i)) };
                if (i % 50 == 0)
                {
                    await Task.Yield();
                }
            }
        }

        Assert.Equal(1000, await Frames.CountTicksAsync(Ticks(1000)));
        Assert.Equal(0, await Frames.CountTicksAsync(Ticks(0)));
    }

    /// <summary>
    /// An item of a streamed argument that cannot be encoded (here a resolver of the client's that refuses the
    /// item's type, as a formatter with a bug or a value it cannot write would) fails the stream as a throwing
    /// enumerable does: the server stops waiting for the item and the caller gets the encoder's exception.
    /// Before, nothing told the server: it waited for the item, and the caller for the reply, for ever.
    /// </summary>
    [Fact]
    public async Task An_item_that_cannot_be_encoded_fails_the_call_with_the_encoders_exception_instead_of_hanging()
    {
        static async IAsyncEnumerable<Tick> Ticks(int count, int refused = -1)
        {
            for (int i = 0; i < count; i++)
            {
                yield return new Tick { Index = i, Checksum = Checksum64.Compute(BitConverter.GetBytes(i)), Label = i == refused ? RefusingResolver.Refused : null };
                await Task.Yield();
            }
        }

        await using OffloadRpcConnection connection = await ConnectAsync(new OffloadRpcOptions { MessagePackResolver = new RefusingResolver() });
        MessagePack.MessagePackSerializationException refused = await Assert.ThrowsAsync<MessagePack.MessagePackSerializationException>(
            () => connection.GetService<IFrameSource>().CountTicksAsync(Ticks(10, refused: 3)).AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Contains(RefusingResolver.Refused, refused.ToString(), StringComparison.Ordinal);
        Assert.Equal(10, await connection.GetService<IFrameSource>().CountTicksAsync(Ticks(10)).AsTask().WaitAsync(TimeSpan.FromSeconds(60))); // the connection serves on
    }

    /// <summary>MessagePack's standard resolver, except that a <see cref="Tick"/> labelled <see cref="Refused"/> cannot be written.</summary>
    private sealed class RefusingResolver : MessagePack.IFormatterResolver
    {
        public const string Refused = "refused by the client's resolver";

        public MessagePack.Formatters.IMessagePackFormatter<T>? GetFormatter<T>() =>
            typeof(T) == typeof(Tick) ? (MessagePack.Formatters.IMessagePackFormatter<T>)(object)new TickFormatter() : MessagePack.Resolvers.StandardResolver.Instance.GetFormatter<T>();

        private sealed class TickFormatter : MessagePack.Formatters.IMessagePackFormatter<Tick>
        {
            public void Serialize(ref MessagePack.MessagePackWriter writer, Tick value, MessagePack.MessagePackSerializerOptions options)
            {
                if (value.Label == Refused)
                {
                    throw new InvalidOperationException(Refused);
                }

                MessagePack.Resolvers.StandardResolver.Instance.GetFormatter<Tick>()!.Serialize(ref writer, value, options);
            }

            public Tick Deserialize(ref MessagePack.MessagePackReader reader, MessagePack.MessagePackSerializerOptions options) =>
                MessagePack.Resolvers.StandardResolver.Instance.GetFormatter<Tick>()!.Deserialize(ref reader, options);
        }
    }

    [Fact]
    public async Task Client_streaming_of_leases_moves_each_one_to_the_server()
    {
        const int Size = 1 << 20;
        async IAsyncEnumerable<SharedBuffer> Rendered(int count)
        {
            for (int i = 0; i < count; i++)
            {
                SharedBuffer frame = _connection.Rent(Size);
                Checksum64.Fill(frame.Span, (ulong)i);
                yield return frame; // written in place; the server owns it once sent
                await Task.Yield();
            }
        }

        ulong expected = 0;
        for (int i = 0; i < 40; i++)
        {
            expected = (expected * 31) + FrameChecksum(Size, i);
        }

        Assert.Equal(expected, await Frames.ChecksumLeasesAsync(Rendered(40)));
    }

    [Fact]
    public async Task A_slow_server_holds_the_client_producer_within_the_window()
    {
        string tag = "drain-" + Guid.NewGuid().ToString("N");
        IFrameSource frames = Frames;
        const int Window = 16;
        int violations = 0;
        int maxAhead = 0;
        async IAsyncEnumerable<int> Values(int count)
        {
            for (int i = 0; i < count; i++)
            {
                ProducerStatus status = await frames.StatusAsync(tag);
                maxAhead = Math.Max(maxAhead, i - status.Produced);
                if (i > status.Produced + Window)
                {
                    violations++; // asked for item i while the server had taken only status.Produced
                }

                yield return i;
            }
        }

        Assert.Equal(120, await frames.SlowDrainAsync(tag, Values(120), 5));
        Assert.Equal(0, violations);
        Assert.True(maxAhead >= Window / 2, $"the producer ran ahead by at most {maxAhead}: the window is not used");
    }

    [Fact]
    public async Task A_client_producer_exception_is_the_caller_s_and_the_server_sees_it_as_a_fault()
    {
        string tag = "fail-" + Guid.NewGuid().ToString("N");
        static async IAsyncEnumerable<int> Failing()
        {
            yield return 0;
            yield return 1;
            await Task.Yield();
            throw new FormatException("client producer broke");
        }

        FormatException own = await Assert.ThrowsAsync<FormatException>(async () => await Frames.SlowDrainAsync(tag, Failing(), 0));
        Assert.Equal("client producer broke", own.Message);
        await Eventually.TrueAsync(async () => (await Frames.StatusAsync(tag)).Finished, "the server's method ended");
        ProducerStatus status = await Frames.StatusAsync(tag);
        Assert.Equal(2, status.Produced);
        Assert.Equal("System.FormatException: client producer broke", status.Error);
    }

    [Fact]
    public async Task Cancelling_a_client_stream_cancels_the_server_method()
    {
        string tag = "ccancel-" + Guid.NewGuid().ToString("N");
        using var cts = new CancellationTokenSource();
        static async IAsyncEnumerable<int> Endless()
        {
            for (int i = 0; ; i++)
            {
                yield return i;
                await Task.Yield();
            }
        }

        Task<int> call = Frames.SlowDrainAsync(tag, Endless(), 1, cts.Token).AsTask();
        await Eventually.TrueAsync(async () => (await Frames.StatusAsync(tag)).Produced >= 5, "the server took a few items");
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => call);
        await Eventually.TrueAsync(async () => (await Frames.StatusAsync(tag)).Finished, "the server's method ended");
        Assert.True((await Frames.StatusAsync(tag)).Cancelled, "the server's method saw cancellation");
    }

    [Fact]
    public async Task Duplex_answers_each_frame_as_it_arrives()
    {
        const int Length = 10_000;
        static async IAsyncEnumerable<ReadOnlyMemory<int>> Numbers(int count)
        {
            int[] frame = new int[Length];
            for (int i = 0; i < count; i++)
            {
                for (int j = 0; j < Length; j++)
                {
                    frame[j] = (i * 7) + j;
                }

                yield return frame; // copied into shared memory before the next is asked for
                await Task.Yield();
            }
        }

        static ulong Expected(int i)
        {
            int[] frame = new int[Length];
            for (int j = 0; j < Length; j++)
            {
                frame[j] = (i * 7) + j;
            }

            return Checksum64.Compute(MemoryMarshal.AsBytes(frame.AsSpan()));
        }

        int k = 0;
        await foreach (ulong checksum in Frames.ChecksumEachAsync(Numbers(100)))
        {
            Assert.Equal(Expected(k), checksum);
            k++;
        }

        Assert.Equal(100, k);
    }

    private static ulong FrameChecksum(int size, int seed)
    {
        byte[] expected = new byte[size];
        Checksum64.Fill(expected, (ulong)seed);
        return Checksum64.Compute(expected);
    }

    [Fact]
    public async Task A_server_that_goes_away_fails_the_call_with_PeerDisconnectedException()
    {
        string endpoint = Endpoints.Unique("gone");
        (PeerProcess process, string socket, string address, _) = await BothWaysServer.StartAsync(endpoint);
        await using (process)
        {
            await using OffloadRpcConnection connection = await ConnectToAsync(AddressOf(socket, address));
            IKitchenSink sink = connection.GetService<IKitchenSink>();
            Assert.Equal("ok", await sink.ConcatAsync("o", "k"));
            Task sleeping = sink.SleepAsync(60_000, CancellationToken.None);
            await Task.Delay(200);
            process.Kill();
            await Assert.ThrowsAsync<PeerDisconnectedException>(() => sleeping);
            await Assert.ThrowsAsync<PeerDisconnectedException>(() => sink.ConcatAsync("a", "b"));
        }

        Endpoints.RemoveStale(endpoint);
    }

    private Task<OffloadRpcConnection> ConnectToAsync(string address) => ExpectSharedMemory
        ? OffloadRpcConnection.ConnectAsync(address)
        : OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
}
