using Microsoft.Extensions.Logging.Abstractions;
using OffloadRpc.Internal;
using OffloadRpc.TestContracts;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// Two pipelines in one process (two clients, two servers, each with its own interceptors) whose calls
/// alternate: each call runs its own pipeline's interceptors, and each pipeline builds its chain once.
/// </summary>
public sealed class InterceptorChainTests : IDisposable
{
    private readonly List<string> _seen = [];
    private readonly LoopbackInvoker _first = new(new Adder());
    private readonly LoopbackInvoker _second = new(new Adder());

    public InterceptorChainTests()
    {
        _first.Pipeline = new ClientPipeline([new Tagging(_seen, "client-1")], null, NullLogger.Instance, TimeSpan.MaxValue);
        _second.Pipeline = new ClientPipeline([new Tagging(_seen, "client-2a"), new Tagging(_seen, "client-2b")], null, NullLogger.Instance, TimeSpan.MaxValue);
        _first.Dispatcher.Pipeline = new ServerPipeline([new ServerTagging(_seen, "server-1")], NullLogger.Instance, TimeSpan.MaxValue);
        _second.Dispatcher.Pipeline = new ServerPipeline([new ServerTagging(_seen, "server-2")], NullLogger.Instance, TimeSpan.MaxValue);
    }

    public void Dispose()
    {
        _first.Dispose();
        _second.Dispose();
    }

    [Fact]
    public async Task Two_pipelines_whose_calls_alternate_run_their_own_interceptors_and_build_each_chain_once()
    {
        IImageService first = ServiceRegistry.Find<IImageService>()!.CreateProxy(_first);
        IImageService second = ServiceRegistry.Find<IImageService>()!.CreateProxy(_second);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(3 + i, await first.AddAsync(1, 2 + i));
            Assert.Equal(["client-1", "server-1"], Drain());
            Assert.Equal(30 + i, await second.AddAsync(10, 20 + i));
            Assert.Equal(["client-2a", "client-2b", "server-2"], Drain());
        }

        Assert.Equal(1, _first.Pipeline!.Chains.Built); // the int chain, once, though the other pipeline's calls came in between
        Assert.Equal(1, _second.Pipeline!.Chains.Built);
        Assert.Equal(1, _first.Dispatcher.Pipeline!.Chains.Built);
        Assert.Equal(1, _second.Dispatcher.Pipeline!.Chains.Built);
    }

    [Fact]
    public void A_pipeline_keeps_its_chain_of_each_result_type_while_another_pipeline_builds_its_own()
    {
        ClientPipeline one = _first.Pipeline!;
        ClientPipeline other = _second.Pipeline!;
        ClientCallContinuation<int> ints = one.Chain<int>();
        ClientCallContinuation<string> strings = one.Chain<string>();
        Assert.NotSame(ints, other.Chain<int>());
        Assert.Same(ints, one.Chain<int>());
        Assert.Same(strings, one.Chain<string>());
        Assert.Equal(2, one.Chains.Built);
        Assert.Equal(1, other.Chains.Built);
    }

    private string[] Drain()
    {
        lock (_seen)
        {
            string[] seen = [.. _seen];
            _seen.Clear();
            return seen;
        }
    }

    private sealed class Tagging(List<string> seen, string tag) : ClientInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation)
        {
            lock (seen)
            {
                seen.Add(tag);
            }

            return continuation(context);
        }
    }

    private sealed class ServerTagging(List<string> seen, string tag) : ServerInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ServerInterceptorContext context, ServerCallContinuation<TResult> continuation)
        {
            lock (seen)
            {
                seen.Add(tag);
            }

            return continuation(context);
        }
    }

    private sealed class Adder : IImageService
    {
        public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default) => throw new NotSupportedException();
    }
}
