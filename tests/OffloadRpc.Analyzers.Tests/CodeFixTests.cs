using OffloadRpc.CodeFixes;
using Xunit;
using Verify = OffloadRpc.Analyzers.Tests.AnalyzerVerifier<OffloadRpc.Analyzers.TransferAdviceAnalyzer>;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>Every transfer-advice fix, one at a time and all at once (Fix All).</summary>
public sealed class CodeFixTests
{
    private const string Usings = """
        using System;
        using System.Threading.Tasks;
        using OffloadRpc;

        """;

    [Fact]
    public Task OFFRPC2001_fix_switches_the_declared_mode_to_Pipelined() => Verify.VerifyFixAsync<TransferModeFix>(
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync([Transfer(TransferMode.Copy)] ReadOnlyMemory<byte> data);
        }

        public static class Caller
        {
            public static Task Run(IService service) => service.SendAsync({|OFFRPC2001:new byte[8 << 20]|});
        }
        """,
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync([Transfer(TransferMode.Pipelined, CachePolicy.Auto)] ReadOnlyMemory<byte> data);
        }

        public static class Caller
        {
            public static Task Run(IService service) => service.SendAsync(new byte[8 << 20]);
        }
        """);

    [Fact]
    public Task OFFRPC2001_fix_rewrites_the_methods_attribute_for_a_local_of_known_size() => Verify.VerifyFixAsync<TransferModeFix>(
        Usings + """
        [OffloadService]
        public interface IService
        {
            [Transfer(TransferMode.Copy)]
            Task SendAsync(ReadOnlyMemory<byte> data);
        }

        public static class Caller
        {
            public static Task Run(IService service)
            {
                var big = new byte[64 * 1024 * 1024];
                return service.SendAsync({|OFFRPC2001:big|});
            }
        }
        """,
        Usings + """
        [OffloadService]
        public interface IService
        {
            [Transfer(TransferMode.Pipelined, CachePolicy.Auto)]
            Task SendAsync(ReadOnlyMemory<byte> data);
        }

        public static class Caller
        {
            public static Task Run(IService service)
            {
                var big = new byte[64 * 1024 * 1024];
                return service.SendAsync(big);
            }
        }
        """);

    [Fact]
    public Task OFFRPC2002_fix_bypasses_the_cache_and_keeps_ExpectedBytes() => Verify.VerifyFixAsync<TransferModeFix>(
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync([Transfer(TransferMode.Hybrid, CachePolicy.Inject, ExpectedBytes = 100_000_000)] ReadOnlyMemory<byte> {|OFFRPC2002:frame|});
            Task OtherAsync([Transfer(TransferMode.Offload, CachePolicy.Inject, ExpectedBytes = 200_000_000)] ReadOnlyMemory<byte> {|OFFRPC2002:batch|});
        }
        """,
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync([Transfer(TransferMode.Hybrid, CachePolicy.Bypass, ExpectedBytes = 100_000_000)] ReadOnlyMemory<byte> frame);
            Task OtherAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass, ExpectedBytes = 200_000_000)] ReadOnlyMemory<byte> batch);
        }
        """);

    [Fact]
    public Task OFFRPC2003_fix_copies_small_payloads_into_the_cache() => Verify.VerifyFixAsync<TransferModeFix>(
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task HeaderAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass, ExpectedBytes = 64)] ReadOnlyMemory<byte> {|OFFRPC2003:header|});
        }
        """,
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task HeaderAsync([Transfer(TransferMode.Copy, CachePolicy.Inject, ExpectedBytes = 64)] ReadOnlyMemory<byte> header);
        }
        """);

    [Fact]
    public Task OFFRPC2004_fix_passes_the_buffer_instead_of_a_fresh_copy() => Verify.VerifyFixAsync<ByteArrayParameterFix>(
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync(ReadOnlyMemory<byte> frame);
        }

        public static class Caller
        {
            public static Task Run(IService service, ReadOnlyMemory<byte> frame) => service.SendAsync({|OFFRPC2004:frame.ToArray()|});
        }
        """,
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync(ReadOnlyMemory<byte> frame);
        }

        public static class Caller
        {
            public static Task Run(IService service, ReadOnlyMemory<byte> frame) => service.SendAsync(frame);
        }
        """);

    [Fact]
    public Task OFFRPC2004_fix_takes_ReadOnlyMemory_for_every_byte_array_parameter() => Verify.VerifyFixAsync<ByteArrayParameterFix>(
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync(byte[] {|OFFRPC2004:frame|}, int index);
            Task<int> CountAsync(byte[] {|OFFRPC2004:first|}, byte[] {|OFFRPC2004:second|});
        }
        """,
        Usings + """
        [OffloadService]
        public interface IService
        {
            Task SendAsync(ReadOnlyMemory<byte> frame, int index);
            Task<int> CountAsync(ReadOnlyMemory<byte> first, ReadOnlyMemory<byte> second);
        }
        """);
}
