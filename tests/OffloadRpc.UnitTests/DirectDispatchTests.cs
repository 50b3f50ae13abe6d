using OffloadRpc.Internal;
using OffloadRpc.TestContracts;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// A call with nothing around it is served by the dispatcher's direct path, in the caller's own flow (the
/// poller's, on shared memory): what the method sets in its execution context must not outlive the call there.
/// </summary>
public sealed class DirectDispatchTests
{
    private static readonly AsyncLocal<string?> SetByMethod = new();

    [Fact]
    public void A_method_served_directly_sees_its_call_and_leaves_the_callers_context_as_it_was()
    {
        var dispatcher = new ServiceDispatcher(new SerializerOptionsSource(resolver: null));
        var images = new ContextProbe();
        ServiceDescriptor<IImageService> descriptor = ServiceRegistry.Find<IImageService>()!;
        dispatcher.Add(descriptor, descriptor.CreateStub(images));
        int add = descriptor.Methods.Single(m => m.Name == nameof(IImageService.AddAsync)).Id;

        SetByMethod.Value = "caller";
        var call = new OneCall(add, [0x92, 0x02, 0x03]); // MessagePack [2, 3]
        ValueTask served = dispatcher.DispatchAsync(call);

        Assert.True(served.IsCompletedSuccessfully); // the method completed at once: no async step of the dispatcher's
        Assert.Equal(new byte[] { 0x05 }, call.ReplyBody); // 2 + 3
        Assert.NotNull(images.Seen);
        Assert.Same(images.Seen, images.SeenAgain); // one context per call, however often the method asks
        Assert.Equal(nameof(IImageService.AddAsync), images.Seen!.MethodName);
        Assert.Null(OffloadCallContext.Current); // not the caller's once the method returned
        Assert.Equal("caller", SetByMethod.Value); // and neither is what the method set in its context
    }

    private sealed class ContextProbe : IImageService
    {
        public OffloadCallContext? Seen { get; private set; }

        public OffloadCallContext? SeenAgain { get; private set; }

        public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default)
        {
            Seen = OffloadCallContext.Current;
            SeenAgain = OffloadCallContext.Current;
            SetByMethod.Value = "method";
            return ValueTask.FromResult(a + b);
        }

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default) => throw new NotSupportedException();
    }

    /// <summary>A request of a body and no payloads, answered in place.</summary>
    private sealed class OneCall(int methodId, byte[] body) : FakeInboundCall(methodId, body)
    {
        public byte[]? ReplyBody { get; private set; }

        public override void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads) => ReplyBody = body.ToArray();
    }
}
