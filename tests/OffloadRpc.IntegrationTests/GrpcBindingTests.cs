using Grpc.AspNetCore.Server;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Grpc.Internal;
using OffloadRpc.Internal;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// How the gRPC transport binds a contract's methods (the calls themselves are tested across two
/// processes in <see cref="GrpcTransportTests"/>): each method as the least streaming its shape needs.
/// </summary>
public sealed class GrpcBindingTests
{
    private const string Images = "/OffloadRpc.TestContracts.IImageService/";

    [Fact]
    public async Task The_server_binds_each_method_as_the_least_streaming_its_shape_needs()
    {
        string endpoint = Endpoints.Unique("binding");
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
        builder.Services.AddOffloadRpcServer(endpoint).AddService<IImageService, ImageService>(ServiceLifetime.Singleton);
        await using WebApplication app = builder.Build();
        app.MapOffloadRpcGrpc();

        Dictionary<string, MethodType> bound = ((IEndpointRouteBuilder)app).DataSources
            .SelectMany(source => source.Endpoints)
            .Select(e => e.Metadata.GetMetadata<GrpcMethodMetadata>()?.Method)
            .OfType<IMethod>()
            .DistinctBy(m => m.FullName)
            .ToDictionary(m => m.FullName, m => m.Type);

        Assert.Equal(MethodType.Unary, bound[Images + "AddAsync"]); // MessagePack only, each way
        Assert.Equal(MethodType.ClientStreaming, bound[Images + "ChecksumAsync"]); // a buffer in, a plain result out
        Assert.Equal(MethodType.ClientStreaming, bound[Images + "DetectAsync"]);
        Assert.Equal(MethodType.ClientStreaming, bound[Images + "ProcessAsync"]);
        Assert.Equal(MethodType.ServerStreaming, bound[Images + "RenderAsync"]); // a buffer out
        Assert.Equal(MethodType.DuplexStreaming, bound[Images + "EchoAsync"]); // buffers both ways
        Assert.Equal(MethodType.Unary, bound["/offloadrpc.Server/Describe"]);
        Endpoints.RemoveStale(endpoint);
    }

    [Fact]
    public void A_method_of_unknown_shape_is_duplex_and_never_called_as_unary()
    {
        var described = new MethodDescriptor("Svc", "Plain", 1) { Shape = MethodShape.Described };
        var unknown = new MethodDescriptor("Svc", "Old", 2); // generated before methods had a shape

        Assert.Equal(MethodType.Unary, GrpcWire.BindingOf(described));
        Assert.True(new GrpcMethod(described).OneFrameReply);
        Assert.Equal(MethodType.DuplexStreaming, GrpcWire.BindingOf(unknown));
        Assert.False(new GrpcMethod(unknown).OneFrameReply);
        Assert.Equal(MethodType.DuplexStreaming, GrpcWire.BindingOf(new MethodDescriptor("Svc", "Items", 3) { Shape = MethodShape.Described | MethodShape.StreamedArgument }));
        Assert.Equal(MethodType.ServerStreaming, GrpcWire.BindingOf(new MethodDescriptor("Svc", "Stream", 4) { Shape = MethodShape.Described | MethodShape.StreamedResult }));
        Assert.Equal("/Svc/Old", new GrpcMethod(unknown).Unary.FullName); // the same path, whatever the call
    }

    [Fact]
    public void A_served_calls_token_asked_for_after_the_call_ended_is_cancelled_and_links_to_nothing()
    {
        // Asked for during the call, then again after it: the source made during the call is disposed with
        // it, and asking again neither throws nor makes another.
        using var aborted = new CancellationTokenSource();
        var context = new FakeServerCallContext(aborted.Token);
        var call = new GrpcInboundCall(1, new MessageAssembler(1024), context, default, null, null, 4, 1024);
        Assert.False(call.CancellationToken.IsCancellationRequested); // made on first use, linked to the request's
        call.Dispose();
        Assert.True(call.CancellationToken.IsCancellationRequested);
        call.CancelAfter(TimeSpan.FromMilliseconds(1)); // harmless once ended
        call.Dispose();

        // Asked for only after the call ended (a writer failing late, a context kept past the call): the
        // request's token (which Kestrel reuses for later requests) is not even read.
        var late = new FakeServerCallContext(aborted.Token);
        var ended = new GrpcInboundCall(2, new MessageAssembler(1024), late, default, null, null, 4, 1024);
        ended.Dispose();
        Assert.True(ended.CancellationToken.IsCancellationRequested);
        Assert.Equal(0, late.TokenReads);
    }

    /// <summary>Just the parts of a gRPC server call a <see cref="GrpcInboundCall"/> reads.</summary>
    private sealed class FakeServerCallContext(CancellationToken aborted) : ServerCallContext
    {
        public int TokenReads { get; private set; }

        protected override string MethodCore => "/Svc/M";

        protected override string HostCore => "localhost";

        protected override string PeerCore => "unix:";

        protected override DateTime DeadlineCore => DateTime.MaxValue;

        protected override Metadata RequestHeadersCore => [];

        protected override CancellationToken CancellationTokenCore
        {
            get
            {
                TokenReads++;
                return aborted;
            }
        }

        protected override Metadata ResponseTrailersCore => [];

        protected override Status StatusCore { get; set; }

        protected override WriteOptions? WriteOptionsCore { get; set; }

        protected override AuthContext AuthContextCore => new(null, []);

        protected override ContextPropagationToken CreatePropagationTokenCore(ContextPropagationOptions? options) => throw new NotSupportedException();

        protected override Task WriteResponseHeadersAsyncCore(Metadata responseHeaders) => Task.CompletedTask;
    }

    /// <summary>Bound, never called here.</summary>
    private sealed class ImageService : IImageService
    {
        public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => ValueTask.FromResult(Checksum64.Compute(frame.Span));

        public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => ValueTask.FromResult(data);

        public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default) => ValueTask.FromResult(Array.Empty<Detection>());

        public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default) => ValueTask.FromResult(OffloadCallContext.Current!.Rent(width * height));

        public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default)
        {
            frame.Dispose();
            return ValueTask.CompletedTask;
        }
    }
}
