using Xunit;
using Verify = OffloadRpc.Analyzers.Tests.AnalyzerVerifier<OffloadRpc.Analyzers.TransferAdviceAnalyzer>;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>OFFRPC2001-2004: advice where the payload size is known before anything runs.</summary>
public sealed class TransferAdviceAnalyzerTests
{
    private const string Service = """
        using System;
        using System.Threading;
        using System.Threading.Tasks;
        using OffloadRpc;

        [OffloadService]
        public interface IService
        {
            Task CopyAsync([Transfer(TransferMode.Copy)] ReadOnlyMemory<byte> data);
            Task InjectAsync([Transfer(TransferMode.Pipelined, CachePolicy.Inject)] ReadOnlyMemory<byte> data);
            Task OffloadAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);
            Task AutoAsync(ReadOnlyMemory<byte> data);
        }

        """;

    [Fact]
    public Task OFFRPC2001_a_large_constant_buffer_passed_in_Copy_mode() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                await service.CopyAsync({|OFFRPC2001:new byte[8 << 20]|});
                await service.CopyAsync(new byte[4096]);        // small: fine in Copy mode
                await service.AutoAsync(new byte[64 << 20]);    // Auto decides at run time
            }
        }
        """);

    [Fact]
    public Task OFFRPC2002_a_payload_larger_than_the_cache_written_with_Inject() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                await service.InjectAsync({|OFFRPC2002:new byte[64 << 20]|});
                await service.InjectAsync(new byte[8 << 20]);   // fits in the cache
            }
        }
        """);

    [Fact]
    public Task OFFRPC2003_a_small_payload_offloaded_with_Bypass() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                await service.OffloadAsync({|OFFRPC2003:new byte[512]|});
                await service.OffloadAsync(new byte[16 << 20]);  // large: offload is right
            }
        }
        """);

    [Fact]
    public Task ExpectedBytes_on_the_declaration_is_checked_against_its_own_mode() => Verify.VerifyAsync("""
        using System;
        using System.Threading.Tasks;
        using OffloadRpc;

        [OffloadService]
        public interface IFrames
        {
            Task SendAsync([Transfer(TransferMode.Copy, CachePolicy.Inject, ExpectedBytes = 100_000_000)] ReadOnlyMemory<byte> {|OFFRPC2001:{|OFFRPC2002:frame|}|});
            Task TinyAsync([Transfer(TransferMode.Pipelined, ExpectedBytes = 64)] ReadOnlyMemory<byte> {|OFFRPC2003:header|});
            Task RightAsync([Transfer(TransferMode.Hybrid, CachePolicy.Bypass, ExpectedBytes = 100_000_000)] ReadOnlyMemory<byte> frame);
        }
        """);

    [Fact]
    public Task OFFRPC2004_a_byte_array_service_parameter() => Verify.VerifyAsync("""
        using System;
        using System.Threading.Tasks;
        using OffloadRpc;

        [OffloadService]
        public interface IFrames
        {
            Task SendAsync(byte[] {|OFFRPC2004:frame|});
            Task SendMemoryAsync(ReadOnlyMemory<byte> frame);
            Task<byte[]> ResultAsync(int n);
        }

        public interface INotAService
        {
            Task SendAsync(byte[] frame);
        }
        """);

    [Fact]
    public Task Thresholds_come_from_editorconfig() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                await service.CopyAsync({|OFFRPC2001:new byte[8192]|});   // above a 4 KiB threshold
                await service.OffloadAsync(new byte[8192]);
            }
        }
        """, "offloadrpc.offload_threshold_bytes = 4096\n");
}
