using System.Net.Sockets;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using OffloadRpc.Cli;
using OffloadRpc.PeerBench.Grpc;
using StreamJsonRpc;

namespace OffloadRpc.PeerBench;

/// <summary>
/// The server process of each system: serves the three operations, prints <c>READY</c> on stdout,
/// and serves until its stdin closes (the client closes it, or dies).
/// </summary>
internal static class Servers
{
    /// <summary>
    /// HTTP/2 receive windows for gRPC. The payloads flow client to server, so Kestrel's windows govern
    /// them: per stream and per connection as large as the largest payload of a run (256 MiB; the
    /// defaults are 768 KiB and 1 MiB), so a message never stops for a window update. The client's
    /// receive window (replies only) is the most SocketsHttpHandler takes, 16 MiB. Measured: raising
    /// Kestrel's from 16 to 256 MiB changed nothing beyond noise at 1-64 MiB.
    /// </summary>
    public const int ServerWindowBytes = 256 << 20;

    /// <inheritdoc cref="ServerWindowBytes"/>
    public const int ClientWindowBytes = 16 << 20;

    public static async Task<int> RunAsync(string kind, string endpoint)
    {
        switch (kind)
        {
            case "offloadrpc":
            {
                TimeSpan? spin = double.TryParse(Environment.GetEnvironmentVariable(ServerProcess.SpinVariable), System.Globalization.CultureInfo.InvariantCulture, out double microseconds) ? TimeSpan.FromMicroseconds(microseconds) : null;
                await using var server = new OffloadRpcServer(endpoint, OffloadOptions(spin));
                server.Register<IPeerBenchService>(new OffloadService());
                server.ConnectionFailed += ex => Console.Error.WriteLine($"peerbench server: a client failed: {ex.GetType().Name}: {ex.Message}");
                await server.StartAsync();
                return await ServeUntilStdinClosesAsync();
            }

            case "grpc":
                return await ServeGrpcAsync(endpoint, plain: true, ours: false);

            case "offloadrpc-grpc":
                return await ServeGrpcAsync(endpoint, plain: false, ours: true);

            case "grpc-both":
                return await ServeGrpcAsync(endpoint, plain: true, ours: true);

            case "streamjsonrpc":
            {
                using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                listener.Bind(new UnixDomainSocketEndPoint(endpoint));
                listener.Listen();
                _ = Task.Run(async () =>
                {
                    while (true)
                    {
                        Socket socket;
                        try
                        {
                            socket = await listener.AcceptAsync();
                        }
                        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
                        {
                            return; // shutting down
                        }

                        var stream = new NetworkStream(socket, ownsSocket: true);
                        var rpc = new JsonRpc(new LengthHeaderMessageHandler(stream, stream, new MessagePackFormatter()), new JsonRpcService());
                        rpc.StartListening();
                    }
                });
                try
                {
                    return await ServeUntilStdinClosesAsync();
                }
                finally
                {
                    File.Delete(endpoint);
                }
            }

            default:
                Console.Error.WriteLine($"unknown server kind '{kind}'");
                return 2;
        }
    }

    /// <summary>
    /// An ASP.NET Core app on a Unix socket, HTTP/2 only: plain gRPC's service (<paramref name="plain"/>),
    /// this library's over its gRPC transport (<paramref name="ours"/>; it listens on shared memory too, as a
    /// hosted server does, which the client is told not to use), or both in one process on one socket, the
    /// same Kestrel settings for each (<c>--pairs</c>: one server process, so that no difference of two
    /// processes' places on the cores or their heaps passes for a difference of the two stacks).
    /// </summary>
    private static async Task<int> ServeGrpcAsync(string endpoint, bool plain, bool ours)
    {
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.Logging.AddConsole(o => o.LogToStandardErrorThreshold = LogLevel.Warning).SetMinimumLevel(LogLevel.Warning);
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.ListenUnixSocket(endpoint, listen => listen.Protocols = HttpProtocols.Http2);
            kestrel.Limits.MaxRequestBodySize = null;
            kestrel.Limits.Http2.InitialConnectionWindowSize = ServerWindowBytes;
            kestrel.Limits.Http2.InitialStreamWindowSize = ServerWindowBytes;
        });
        builder.Services.AddGrpc(options =>
        {
            options.MaxReceiveMessageSize = null; // default 4 MB
            options.MaxSendMessageSize = null;
        });
        if (ours)
        {
            builder.Services.AddOffloadRpcServer(endpoint + ".shm").AddService<IPeerBenchService, OffloadService>(ServiceLifetime.Singleton);
            builder.Services.AddOffloadRpcGrpc();
        }

        await using WebApplication app = builder.Build();
        if (plain)
        {
            app.MapGrpcService<GrpcService>();
        }

        if (ours)
        {
            app.MapOffloadRpcGrpc();
        }

        await app.StartAsync();
        try
        {
            return await ServeUntilStdinClosesAsync();
        }
        finally
        {
            await app.StopAsync();
            File.Delete(endpoint);
        }
    }

    /// <summary>Default options, but for the spin budget when the run sets one (<c>--spin-us</c>).</summary>
    public static OffloadRpcOptions OffloadOptions(TimeSpan? spinBudget) => spinBudget is { } spin ? new OffloadRpcOptions { SpinBudget = spin } : new OffloadRpcOptions();

    private static async Task<int> ServeUntilStdinClosesAsync()
    {
        Console.WriteLine($"READY {Environment.ProcessId}");
        await Task.Run(() => Console.In.ReadToEnd());
        return 0;
    }

    /// <summary>The <c>touch</c> operation: reads the first and the last byte (the sum can never be 511, so the reads cannot be dropped) and returns the length.</summary>
    public static long Touch(ReadOnlySpan<byte> data) => data.Length > 0 && data[0] + data[^1] == 511 ? -1 : data.Length;

    internal sealed class OffloadService : IPeerBenchService
    {
        public ValueTask<int> AddAsync(int a, int b) => new(a + b);

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data) => new(PayloadChecksum.Compute(data.Span));

        public ValueTask<long> TouchAsync(ReadOnlyMemory<byte> data) => new(Touch(data.Span));

        public ValueTask<ulong> ChecksumSharedAsync(SharedBuffer data)
        {
            using (data)
            {
                return new(PayloadChecksum.Compute(data.Span));
            }
        }

        public ValueTask<long> TouchSharedAsync(SharedBuffer data)
        {
            using (data)
            {
                return new(Touch(data.Span));
            }
        }

        public ValueTask<ulong> ChecksumCopyInjectAsync(ReadOnlyMemory<byte> data) => ChecksumAsync(data);

        public ValueTask<long> TouchCopyInjectAsync(ReadOnlyMemory<byte> data) => TouchAsync(data);

        public ValueTask<ulong> ChecksumCopyBypassAsync(ReadOnlyMemory<byte> data) => ChecksumAsync(data);

        public ValueTask<long> TouchCopyBypassAsync(ReadOnlyMemory<byte> data) => TouchAsync(data);

        public ValueTask<ulong> ChecksumOffloadInjectAsync(ReadOnlyMemory<byte> data) => ChecksumAsync(data);

        public ValueTask<long> TouchOffloadInjectAsync(ReadOnlyMemory<byte> data) => TouchAsync(data);

        public ValueTask<ulong> ChecksumOffloadBypassAsync(ReadOnlyMemory<byte> data) => ChecksumAsync(data);

        public ValueTask<long> TouchOffloadBypassAsync(ReadOnlyMemory<byte> data) => TouchAsync(data);

        public ValueTask<ulong> ChecksumHybridInjectAsync(ReadOnlyMemory<byte> data) => ChecksumAsync(data);

        public ValueTask<long> TouchHybridInjectAsync(ReadOnlyMemory<byte> data) => TouchAsync(data);

        public ValueTask<ulong> ChecksumHybridBypassAsync(ReadOnlyMemory<byte> data) => ChecksumAsync(data);

        public ValueTask<long> TouchHybridBypassAsync(ReadOnlyMemory<byte> data) => TouchAsync(data);

        public async IAsyncEnumerable<SharedBuffer> FramesSharedAsync(int count, int size, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken ct = default)
        {
            OffloadCallContext context = OffloadCallContext.Current!;
            for (int i = 0; i < count && !ct.IsCancellationRequested; i++)
            {
                SharedBuffer frame = context.Rent(size);
                StreamBench.Stamp(frame.Span, i);
                yield return frame;
            }

            await Task.CompletedTask;
        }

        public async IAsyncEnumerable<ReadOnlyMemory<byte>> FramesAsync(int count, int size, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken ct = default)
        {
            byte[] frame = GC.AllocateUninitializedArray<byte>(size, pinned: true);
            frame.AsSpan().Fill(0x5A);
            for (int i = 0; i < count && !ct.IsCancellationRequested; i++)
            {
                StreamBench.Stamp(frame, i);
                yield return frame; // copied into shared memory before the next one is stamped
            }

            await Task.CompletedTask;
        }

        public async ValueTask<ulong> ChecksumStreamAsync(Stream data)
        {
            // Pipelined: each read returns as soon as its chunk has landed, so the checksum runs behind the copy.
            var checksum = default(PayloadChecksum);
            byte[] buffer = new byte[1 << 20];
            int read;
            while ((read = await data.ReadAsync(buffer)) > 0)
            {
                checksum.Append(buffer.AsSpan(0, read));
            }

            return checksum.Finish();
        }

        public async ValueTask<ulong> ChecksumStreamCopyToAsync(Stream data)
        {
            var sink = new ChecksumSink();
            await data.CopyToAsync(sink);
            return sink.Finish();
        }
    }

    /// <summary>Checksums what is written to it (a CopyToAsync destination).</summary>
    private sealed class ChecksumSink : OffloadRpc.Testing.WriteSink
    {
        private PayloadChecksum _checksum;

        public ulong Finish() => _checksum.Finish();

        protected override void Consume(ReadOnlySpan<byte> bytes, bool inPlace) => _checksum.Append(bytes);
    }

    internal sealed class GrpcService : PeerBench.Grpc.PeerBench.PeerBenchBase
    {
        public override Task<AddReply> Add(AddRequest request, ServerCallContext context) => Task.FromResult(new AddReply { Sum = request.A + request.B });

        public override Task<ChecksumReply> Checksum(PayloadRequest request, ServerCallContext context) => Task.FromResult(new ChecksumReply { Checksum = PayloadChecksum.Compute(request.Data.Span) });

        public override Task<TouchReply> Touch(PayloadRequest request, ServerCallContext context) => Task.FromResult(new TouchReply { Length = Servers.Touch(request.Data.Span) });

        public override async Task Frames(FramesRequest request, IServerStreamWriter<Frame> responseStream, ServerCallContext context)
        {
            byte[] frame = GC.AllocateUninitializedArray<byte>(request.Size, pinned: true);
            frame.AsSpan().Fill(0x5A);
            for (int i = 0; i < request.Count && !context.CancellationToken.IsCancellationRequested; i++)
            {
                StreamBench.Stamp(frame, i);
                await responseStream.WriteAsync(new Frame { Data = Google.Protobuf.UnsafeByteOperations.UnsafeWrap(frame) }); // written out before it returns
            }
        }
    }

    /// <summary>The StreamJsonRpc target: what MessagePack gives a <c>bin</c> argument is a byte[].</summary>
    private sealed class JsonRpcService : IPeerBenchJsonRpc
    {
        public Task<int> AddAsync(int a, int b) => Task.FromResult(a + b);

        public Task<ulong> ChecksumAsync(byte[] data) => Task.FromResult(PayloadChecksum.Compute(data));

        public Task<long> TouchAsync(byte[] data) => Task.FromResult(Touch(data));
    }
}
