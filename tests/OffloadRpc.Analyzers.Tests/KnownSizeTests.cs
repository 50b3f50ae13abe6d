using Xunit;
using Verify = OffloadRpc.Analyzers.Tests.AnalyzerVerifier<OffloadRpc.Analyzers.TransferAdviceAnalyzer>;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>
/// OFFRPC2001-2003 at a call site whose buffer is a local: its size is known when the local's only
/// value is an array of constant length, and unknown (no advice) as soon as anything else may
/// change the local.
/// </summary>
public sealed class KnownSizeTests
{
    private const string Service = """
        using System;
        using System.Threading.Tasks;
        using OffloadRpc;

        [OffloadService]
        public interface IService
        {
            Task<long> SumCopyAsync([Transfer(TransferMode.Copy)] ReadOnlyMemory<byte> data);
            Task InjectAsync([Transfer(TransferMode.Pipelined, CachePolicy.Inject)] ReadOnlyMemory<byte> data);
            Task OffloadAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);
            Task IntsAsync([Transfer(TransferMode.Copy)] int[] values);
        }

        """;

    [Fact]
    public Task OFFRPC2001_a_local_assigned_once_from_a_constant_array() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                var big = new byte[64 * 1024 * 1024];
                await service.SumCopyAsync({|OFFRPC2001:big|});

                big[0] = 1; // an element write keeps the length
                await service.SumCopyAsync({|OFFRPC2001:big|});

                var uninitialized = GC.AllocateUninitializedArray<byte>(8 << 20);
                await service.SumCopyAsync({|OFFRPC2001:uninitialized|});

                ReadOnlyMemory<byte> memory = new byte[8 << 20];
                await service.SumCopyAsync({|OFFRPC2001:memory|});

                var source = new byte[16 << 20];
                Memory<byte> view = source;
                await service.SumCopyAsync({|OFFRPC2001:view|});

                byte[] assignedLater;
                assignedLater = new byte[8 << 20];
                await service.SumCopyAsync({|OFFRPC2001:assignedLater|});

                var ints = new int[2 << 20]; // 8 MiB of int
                await service.IntsAsync({|OFFRPC2001:ints|});
            }
        }
        """);

    [Fact]
    public Task OFFRPC2001_is_silent_when_the_local_may_hold_another_array() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service, int n, object boxed)
            {
                var reassigned = new byte[64 << 20];
                reassigned = new byte[16];
                await service.SumCopyAsync(reassigned);

                var byRef = new byte[64 << 20];
                Array.Resize(ref byRef, 16);
                await service.SumCopyAsync(byRef);

                var byOut = new byte[64 << 20];
                Make(out byOut);
                await service.SumCopyAsync(byOut);

                var captured = new byte[64 << 20];
                Action shrink = () => captured = new byte[16];
                shrink();
                await service.SumCopyAsync(captured);

                var inLocalFunction = new byte[64 << 20];
                Shrink();
                await service.SumCopyAsync(inLocalFunction);

                await Aliased(service);

                var deconstructed = new byte[64 << 20];
                (deconstructed, n) = (new byte[16], n);
                await service.SumCopyAsync(deconstructed);

                var coalesced = new byte[64 << 20];
                coalesced ??= new byte[16];
                await service.SumCopyAsync(coalesced);

                var variable = new byte[n];
                await service.SumCopyAsync(variable);

                byte[]? pattern = null;
                if (boxed is byte[] matched)
                {
                    pattern = matched;
                }

                await service.SumCopyAsync(pattern);

                void Shrink() => inLocalFunction = new byte[16];
            }

            private static void Make(out byte[] buffer) => buffer = new byte[16];

            private static Task Aliased(IService service)
            {
                var aliased = new byte[64 << 20];
                ref byte[] alias = ref aliased;
                alias = new byte[16];
                return service.SumCopyAsync(aliased);
            }
        }
        """);

    [Fact]
    public Task OFFRPC2002_a_local_larger_than_the_cache_written_with_Inject() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                var frame = new byte[64 << 20];
                await service.InjectAsync({|OFFRPC2002:frame|});

                ReadOnlyMemory<byte> pinned = GC.AllocateArray<byte>(64 << 20, pinned: true);
                await service.InjectAsync({|OFFRPC2002:pinned|});

                var fits = new byte[8 << 20];
                await service.InjectAsync(fits);   // within the cache

                var replaced = new byte[64 << 20];
                Replace(ref replaced);
                await service.InjectAsync(replaced); // unknown after a ref argument
            }

            private static void Replace(ref byte[] buffer) => buffer = new byte[8 << 20];
        }
        """);

    [Fact]
    public Task OFFRPC2003_a_small_local_offloaded_with_Bypass() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service, bool grow)
            {
                var header = new byte[512];
                await service.OffloadAsync({|OFFRPC2003:header|});

                ReadOnlyMemory<byte> small = GC.AllocateUninitializedArray<byte>(64);
                await service.OffloadAsync({|OFFRPC2003:small|});

                var large = new byte[16 << 20];
                await service.OffloadAsync(large);  // large: offload is right

                var maybeGrown = new byte[512];
                if (grow)
                {
                    maybeGrown = new byte[64 << 20];
                }

                await service.OffloadAsync(maybeGrown); // two values: unknown
            }
        }
        """);

    [Fact]
    public Task The_default_threshold_is_the_runtimes_offload_crossover() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                await service.SumCopyAsync(new byte[(4 << 20) - 1]);            // below 4 MiB: Copy is what Auto does too
                await service.SumCopyAsync({|OFFRPC2001:new byte[4 << 20]|});
                await service.OffloadAsync({|OFFRPC2003:new byte[(4 << 20) - 1]|});
                await service.OffloadAsync(new byte[4 << 20]);
            }
        }
        """);
}
